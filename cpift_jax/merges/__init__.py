"""Merge operators, one per module, looked up by module name.

``get("slerp")`` imports ``cpift_jax/merges/slerp.py`` and returns its ``merge`` function.
Adding an operator is adding one file that defines
``merge(models, *, base=None, weights=None, **hparams)``; modules whose name starts with an
underscore are shared helpers, not operators.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

__all__ = ["get", "get_module", "available"]


def available() -> list[str]:
    """Sorted names of every operator module in this package."""
    return sorted(
        info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")
    )


def get_module(name: str):
    """The operator's module (its docstring, leaf-level helpers and ``merge``)."""
    names = available()
    if name not in names:
        raise ValueError(f"unknown merge operator {name!r}; available: {', '.join(names)}")
    module = importlib.import_module(f"{__name__}.{name}")
    if not callable(getattr(module, "merge", None)):
        raise ValueError(f"merge operator module {module.__name__} defines no merge() function")
    return module


def get(name: str) -> Callable:
    """The ``merge`` function of operator ``name``; unknown names list what exists."""
    return get_module(name).merge
