"""Saving and loading project artifacts: parameter pytrees, core masks and JSON metadata.

Parameters use Orbax's ``StandardCheckpointer`` (atomic: written to a temporary directory and
renamed when complete, and it refuses to overwrite an existing checkpoint). Masks are stored
bit-packed (8 entries per byte) beside a JSON file with their leaf shapes. JSON files are written
to a temporary name and renamed, so a crash never leaves a half-written artifact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cpift_jax import masks as masks_lib
from cpift_jax import tree as tree_lib

Pytree = Any

__all__ = ["save_params", "load_params", "save_masks", "load_masks", "write_json", "read_json",
           "config_diff"]


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"missing {what} at {path}")


def save_params(path: str | os.PathLike, params: Pytree) -> None:
    """Writes ``params`` as an Orbax checkpoint at ``path`` (which must not exist yet)."""
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"refusing to overwrite the existing checkpoint {path}")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, jax.tree.map(np.asarray, params))
    checkpointer.wait_until_finished()


def load_params(path: str | os.PathLike, like: Pytree | None = None) -> Pytree:
    """Reads an Orbax checkpoint; with ``like`` its structure, shapes and dtypes are checked."""
    path = Path(path).absolute()
    _require(path, "parameter checkpoint")
    try:
        params = ocp.StandardCheckpointer().restore(path)
    except Exception as err:  # Orbax raises many types for a damaged directory.
        raise ValueError(f"cannot read the parameter checkpoint {path}: {err}") from err
    if like is not None:
        tree_lib.check_same_structure(like, params, names=("expected", str(path)))
    return params


def save_masks(path: str | os.PathLike, mask: Pytree) -> None:
    """Stores a bool pytree bit-packed in ``path/packed`` with its shapes in ``path/shapes.json``."""
    path = Path(path).absolute()
    paths, leaves, _ = tree_lib.flatten(mask)
    save_params(path / "packed", masks_lib.pack(mask))
    write_json(path / "shapes.json", {p: list(np.shape(x)) for p, x in zip(paths, leaves)})


def load_masks(path: str | os.PathLike, like: Pytree) -> Pytree:
    """Inverse of ``save_masks``; ``like`` gives the target structure (params or masks)."""
    path = Path(path).absolute()
    # The stored shapes, as a mask keyed by leaf path, go through the one mask validator.
    shapes = read_json(path / "shapes.json")
    if not isinstance(shapes, dict):
        raise ValueError(f"{path / 'shapes.json'} must map leaf paths to shapes, got {type(shapes).__name__}")
    stored = {p: jax.ShapeDtypeStruct(tuple(s), np.bool_) for p, s in shapes.items()}
    masks_lib.check_mask(like, stored, names=("parameters", f"masks at {path}"))
    packed = load_params(path / "packed")
    return masks_lib.unpack(packed, like)


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> None:
    """Atomic JSON write: a temporary file in the same directory, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    _require(path, "JSON artifact")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupted JSON artifact {path}: {err}") from err


def _flatten_dict(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten_dict(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def config_diff(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ (or exist on one side only) between two JSON-like dicts,
    e.g. a stored artifact's settings and the current ones."""
    a, b = _flatten_dict(old), _flatten_dict(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
