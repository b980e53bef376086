"""Merge operators, one per module, looked up by module name.

``get("slerp")`` imports ``cpift_jax/merges/slerp.py`` and returns its ``merge`` function.
Adding an operator is adding one file that defines
``merge(models, *, base=None, weights=None, **hparams)``; modules whose name starts with an
underscore are shared helpers, not operators.
"""

from __future__ import annotations

from collections.abc import Callable

from cpift_jax import registry

__all__ = ["get", "get_module", "available"]


def available() -> list[str]:
    """Sorted names of every operator module in this package."""
    return registry.names(__path__)


def get_module(name: str):
    """The operator's module (its docstring, leaf-level helpers and ``merge``); an unknown
    name raises ValueError listing the operators."""
    module = registry.load(__name__, __path__, name, kind="merge operator", required=("merge",))
    if not callable(module.merge):
        raise ValueError(f"merge operator module {module.__name__}: merge is not callable")
    return module


def get(name: str) -> Callable:
    """The ``merge`` function of operator ``name``; unknown names list what exists."""
    return get_module(name).merge
