"""The one root of every cache the project keeps: ``$CPIFT_CACHE``, default ``~/.cache/cpift_jax``.

Under it: ``smollm2/`` (the fetched SmolLM2 checkpoint, ``cpift_jax.models.smollm2``),
``toy_base/<key>/`` (pretrained toy base models, keyed by the hash of everything that shaped
them, ``cpift_jax.training.pretrain``) and ``xla/`` (JAX's persistent compilation cache, which
keys its entries itself). Deleting the directory only costs recomputation.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV_VAR", "cache_root", "cache_dir"]

ENV_VAR = "CPIFT_CACHE"


def cache_root() -> Path:
    """``$CPIFT_CACHE`` if set and non-empty, else ``~/.cache/cpift_jax`` (read at each call, so a
    test or a user can redirect it at any time)."""
    root = os.environ.get(ENV_VAR) or os.path.join("~", ".cache", "cpift_jax")
    return Path(root).expanduser()


def cache_dir(name: str) -> Path:
    """``cache_root() / name`` (not created here)."""
    return cache_root() / name
