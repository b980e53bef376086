"""Merge operators, one per module, looked up by module name.

``get("slerp")`` imports ``cpift_jax/merges/slerp.py`` and returns its ``merge`` function.
Adding an operator is adding one file that defines
``merge(models, *, base=None, weights=None, **hparams)`` and declares what it applies to:

    REQUIRES_BASE = False   # merge() needs base= (task vectors are measured from it)
    MIN_MODELS = 1          # fewest models it merges
    MAX_MODELS = None       # most models it merges (None: any number)

``applicable(name, num_models, has_base)`` reads these, so a caller (the benchmark's merge-only
block, the streaming merge) can report "not applicable" before running anything, and any
error the operator raises afterwards is a real failure. Modules whose name starts with an
underscore are shared helpers, not operators.
"""

from __future__ import annotations

from collections.abc import Callable

from cpift_jax import registry

__all__ = ["get", "get_module", "available", "applicable", "DECLARATIONS"]

# Module attributes every operator must define (see the module docstring).
DECLARATIONS = ("REQUIRES_BASE", "MIN_MODELS", "MAX_MODELS")


def available() -> list[str]:
    """Sorted names of every operator module in this package."""
    return registry.names(__path__)


def get_module(name: str):
    """The operator's module (its docstring, leaf-level helpers and ``merge``); an unknown
    name raises ValueError listing the operators, a module missing ``merge`` or one of
    ``DECLARATIONS`` raises ValueError naming it."""
    module = registry.load(__name__, __path__, name, kind="merge operator",
                           required=("merge", *DECLARATIONS))
    if not callable(module.merge):
        raise ValueError(f"merge operator module {module.__name__}: merge is not callable")
    n_min, n_max = module.MIN_MODELS, module.MAX_MODELS
    if not (isinstance(n_min, int) and n_min >= 1) or not (
            n_max is None or (isinstance(n_max, int) and n_max >= n_min)):
        raise ValueError(f"merge operator module {module.__name__}: MIN_MODELS must be an int >= 1"
                         f" and MAX_MODELS None or an int >= MIN_MODELS, got {n_min!r}, {n_max!r}")
    if not isinstance(module.REQUIRES_BASE, bool):
        raise ValueError(f"merge operator module {module.__name__}: REQUIRES_BASE must be a bool, "
                         f"got {module.REQUIRES_BASE!r}")
    return module


def get(name: str) -> Callable:
    """The ``merge`` function of operator ``name``; unknown names list what exists."""
    return get_module(name).merge


def applicable(name: str, num_models: int, has_base: bool) -> tuple[bool, str]:
    """``(True, "")`` if operator ``name`` merges ``num_models`` models with (``has_base``) or
    without a base, by its declarations; else ``(False, reason)`` with what it needs."""
    module = get_module(name)
    n_min, n_max = module.MIN_MODELS, module.MAX_MODELS
    if num_models < n_min or (n_max is not None and num_models > n_max):
        wanted = (f"at least {n_min}" if n_max is None else
                  f"exactly {n_min}" if n_min == n_max else f"{n_min} to {n_max}")
        return False, f"{name} merges {wanted} models, got {num_models}"
    if module.REQUIRES_BASE and not has_base:
        return False, f"{name} needs a base model (its task vectors are measured from it)"
    return True, ""
