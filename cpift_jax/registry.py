"""Registries by module name: a package whose public modules are the entries.

``cpift_jax.merges`` (merge operators) and ``cpift_jax.data.tasks`` (synthetic tasks) both look
entries up this way, so adding one is adding one file. Modules whose name starts with an
underscore are shared helpers, not entries.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence
from types import ModuleType

__all__ = ["names", "load"]


def names(package_path: Sequence[str]) -> list[str]:
    """Sorted names of the public modules found on a package's ``__path__``."""
    return sorted(
        info.name for info in pkgutil.iter_modules(package_path) if not info.name.startswith("_")
    )


def load(package: str, package_path: Sequence[str], name: str, *, kind: str,
         required: Sequence[str]) -> ModuleType:
    """Imports ``package.name``; ValueError listing the entries for an unknown ``name``, and
    naming the attribute when the module lacks one of ``required``."""
    entries = names(package_path)
    if name not in entries:
        raise ValueError(f"unknown {kind} {name!r}; available {kind}s: {', '.join(entries)}")
    module = importlib.import_module(f"{package}.{name}")
    for attr in required:
        if not hasattr(module, attr):
            raise ValueError(f"{kind} module {module.__name__} does not define {attr!r}")
    return module
