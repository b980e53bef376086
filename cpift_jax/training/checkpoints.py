"""Saving and loading project artifacts: parameter pytrees, core masks, train states, JSON.

**Parameters** use Orbax's ``StandardCheckpointer``: atomic (written to a temporary directory and
renamed when complete), never overwriting, and sharded: every process writes the shards it
holds, so a ``jax.Array`` spanning several processes is saved without being gathered.
``load_params(path, like)`` restores onto the shardings of ``like`` (``jax.Array``s or
``jax.ShapeDtypeStruct``s with ``.sharding``), whatever mesh the checkpoint was written from;
host leaves of ``like`` (NumPy arrays) restore as NumPy. Leaves are matched by path, so the
result has ``like``'s containers (an ``nnx.State`` as well as a dict). ``wait=False`` returns
while the arrays are still being written (Orbax async save) with a handle to ``wait()`` on.

**Masks** are stored as bool arrays by the same Orbax path (``<dir>/bool``, compressed on disk:
a 1%-dense mask takes about a fifth of its bit-packed size), beside ``shapes.json``; a sharded
mask is never gathered. Directories written by earlier versions (``<dir>/packed``: uint8 bytes,
``masks.pack`` order) still load.

**Resume points** (``ResumePoint``: a ``training.step.TrainState`` of params, optimizer state
and step, plus the data iterator's state) for resuming a stage mid-way:
``save_train_state``/``load_train_state`` at one path, ``TrainCheckpoints`` for a directory of
every-N-steps checkpoints (``<dir>/<step>/``, the last ``max_to_keep`` kept). The arrays and
the JSON metadata (step, data state) are committed together.

**JSON** files are written to a temporary name and renamed by process 0 only
(``distributed.write_json``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cpift_jax import distributed
from cpift_jax import masks as masks_lib
from cpift_jax import tree as tree_lib
from cpift_jax.training.step import TrainState, replicated_step

Pytree = Any

__all__ = ["save_params", "load_params", "PendingSave", "save_masks", "load_masks",
           "ResumePoint", "save_train_state", "load_train_state", "TrainCheckpoints",
           "write_json", "read_json", "config_diff"]

_STATE, _META = "state", "meta"  # item names of a train-state checkpoint


def _require(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"missing {what} at {path}")


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise FileExistsError(f"refusing to overwrite the existing checkpoint {path}")


def _savable(tree: Pytree) -> Pytree:
    """``jax.Array`` leaves as they are (each process writes its own shards); anything else
    (NumPy, Python scalars) as a host array."""
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), tree)


class PendingSave:
    """A checkpoint still being written in the background; ``wait()`` blocks until it is
    committed (renamed into place) on every process."""

    def __init__(self, checkpointer):
        self._checkpointer = checkpointer

    def wait(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.wait_until_finished()
            self._checkpointer.close()
            self._checkpointer = None


def save_params(path: str | os.PathLike, params: Pytree, *, wait: bool = True) -> PendingSave:
    """Writes ``params`` as an Orbax checkpoint at ``path`` (which must not exist yet), from
    every process. ``wait=False``: returns once the arrays are copied off the devices, and the
    files are written in the background until ``.wait()``."""
    path = Path(path).absolute()
    _refuse_existing(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, _savable(params))
    pending = PendingSave(checkpointer)
    if wait:
        pending.wait()
    return pending


def _stored_tree(path: Path, what: str, read_metadata) -> Pytree:
    _require(path, what)
    try:
        return read_metadata()
    except Exception as err:  # Orbax raises many types for a damaged directory.
        raise ValueError(f"cannot read the {what} {path}: {err}") from err


def _by_path(tree: Pytree) -> dict[str, Any]:
    paths, leaves, _ = tree_lib.flatten(tree)
    return dict(zip(paths, leaves))


def _target(ref, stored) -> Any:
    """The Orbax restore target for one leaf: its sharding if ``ref`` has one, else NumPy."""
    sharding = getattr(ref, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.ShapeDtypeStruct(tuple(ref.shape), ref.dtype, sharding=sharding)
    return np.empty(tuple(stored.shape), stored.dtype)


def _restore_like(path: Path, what: str, stored: Pytree, like: Pytree, restore) -> Pytree:
    """Checks ``like`` against the stored shapes and dtypes (by leaf path), restores with
    per-leaf targets (``_target``) in the stored structure, and returns the leaves in
    ``like``'s structure."""
    stored_by_path = _by_path(stored)
    like_paths, like_leaves, like_def = tree_lib.flatten(like)
    tree_lib.check_same_structure(dict(zip(like_paths, like_leaves)), stored_by_path,
                                  names=("expected", str(path)))
    like_by_path = dict(zip(like_paths, like_leaves))
    targets = tree_lib.map_with_path(lambda p, s: _target(like_by_path[p], s), stored)
    try:
        restored = _by_path(restore(targets))
    except Exception as err:
        raise ValueError(f"cannot read the {what} {path}: {err}") from err
    return jax.tree_util.tree_unflatten(like_def, [restored[p] for p in like_paths])


def load_params(path: str | os.PathLike, like: Pytree | None = None) -> Pytree:
    """Reads an Orbax checkpoint. With ``like``: shapes and dtypes are checked leaf by leaf
    (``ValueError`` naming the leaf) and each leaf is restored onto ``like``'s sharding (or as
    NumPy for host leaves), in ``like``'s structure. Without: the stored structure, on the
    devices it was saved from."""
    path = Path(path).absolute()
    what = "parameter checkpoint"
    checkpointer = ocp.StandardCheckpointer()
    stored = _stored_tree(path, what, lambda: checkpointer.metadata(path).item_metadata.tree)
    if like is None:
        try:
            return checkpointer.restore(path)
        except Exception as err:
            raise ValueError(f"cannot read the {what} {path}: {err}") from err
    return _restore_like(path, what, stored, like,
                         lambda targets: checkpointer.restore(path, targets))


def save_masks(path: str | os.PathLike, mask: Pytree, *, wait: bool = True) -> PendingSave:
    """Stores a bool pytree as Orbax bool arrays in ``path/bool`` (sharded masks stay sharded)
    with its leaf shapes in ``path/shapes.json``."""
    path = Path(path).absolute()
    masks_lib.check_mask(None, mask, names=("mask", "mask"))  # bool leaves, or ValueError
    paths, arrays, _ = tree_lib.flatten(mask)
    _refuse_existing(path / "bool")
    pending = save_params(path / "bool", mask, wait=wait)
    write_json(path / "shapes.json", {p: list(np.shape(x)) for p, x in zip(paths, arrays)})
    distributed.barrier(f"save_masks:{path}")  # shapes.json is visible before anyone reads it
    return pending


def _bool_like(like: Pytree) -> Pytree:
    def one(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.Sharding):
            return jax.ShapeDtypeStruct(tuple(x.shape), np.bool_, sharding=sharding)
        return np.empty(np.shape(x), np.bool_)

    return jax.tree.map(one, like)


def load_masks(path: str | os.PathLike, like: Pytree) -> Pytree:
    """Inverse of ``save_masks``; ``like`` (params or masks) gives the structure and, where its
    leaves have one, the sharding of each mask leaf."""
    path = Path(path).absolute()
    # The stored shapes, as a mask keyed by leaf path, go through the one mask validator.
    shapes = read_json(path / "shapes.json")
    if not isinstance(shapes, dict):
        raise ValueError(f"{path / 'shapes.json'} must map leaf paths to shapes, got {type(shapes).__name__}")
    stored = {p: jax.ShapeDtypeStruct(tuple(s), np.bool_) for p, s in shapes.items()}
    masks_lib.check_mask(like, stored, names=("parameters", f"masks at {path}"))
    if (path / "packed").exists() and not (path / "bool").exists():
        return masks_lib.unpack(load_params(path / "packed"), like)
    return load_params(path / "bool", _bool_like(like))


# ------------------------------------------------------------------------------ train state


@dataclasses.dataclass
class ResumePoint:
    """What a stage needs to resume mid-way: ``state`` (params, optimizer state, and
    ``state.step``, the number of steps taken) and ``data_state``, the data iterator's position
    after those steps (JSON: ``GlobalBatchLoader.get_state()`` or ``{"batches_taken": n}``)."""

    state: TrainState
    data_state: dict


def _train_args(point: ResumePoint):
    state = point.state
    return ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(_savable({"params": state.params,
                                                "opt_state": state.opt_state})),
        _META: ocp.args.JsonSave({"step": int(state.step), "data_state": point.data_state}),
    })


def _restore_train(path: Path, like: TrainState, stored_tree, restore) -> ResumePoint:
    """``like``: a ``TrainState`` of arrays or ``jax.ShapeDtypeStruct``s whose shardings the
    restored arrays take (``load_params``); its ``step`` leaf gives the step's sharding."""
    like_arrays = {"params": like.params, "opt_state": like.opt_state}

    def read(targets):
        return restore(ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(targets),
                                             _META: ocp.args.JsonRestore()}))

    meta = {}

    def restore_state(targets):
        out = read(targets)
        meta.update(out[_META])
        return out[_STATE]

    arrays = _restore_like(path, "train-state checkpoint", stored_tree, like_arrays,
                           restore_state)
    if set(meta) != {"step", "data_state"}:
        raise ValueError(f"train-state checkpoint {path}: metadata must hold step and "
                         f"data_state, got {sorted(meta)}")
    step_sharding = getattr(like.step, "sharding", None)
    step = (replicated_step(int(meta["step"]), step_sharding)
            if isinstance(step_sharding, jax.sharding.Sharding) else np.int32(meta["step"]))
    return ResumePoint(TrainState(arrays["params"], arrays["opt_state"], step),
                       meta["data_state"])


def _item_handlers() -> dict:
    # Named handlers let Orbax read an item's metadata before restoring it.
    return {_STATE: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()}


def _composite_checkpointer():
    return ocp.AsyncCheckpointer(ocp.CompositeCheckpointHandler(**_item_handlers()))


def save_train_state(path: str | os.PathLike, point: ResumePoint, *,
                     wait: bool = True) -> PendingSave:
    """Writes ``point`` at ``path`` (which must not exist) from every process; the arrays and
    the step/data metadata are committed together."""
    path = Path(path).absolute()
    _refuse_existing(path)
    checkpointer = _composite_checkpointer()
    checkpointer.save(path, args=_train_args(point))
    pending = PendingSave(checkpointer)
    if wait:
        pending.wait()
    return pending


def load_train_state(path: str | os.PathLike, like: TrainState) -> ResumePoint:
    """Inverse of ``save_train_state``; arrays land on the shardings of ``like``'s leaves
    (``load_params``), which also give the structure (``ValueError`` naming the leaf and
    ``path`` on a mismatch)."""
    path = Path(path).absolute()
    what = "train-state checkpoint"
    checkpointer = _composite_checkpointer()
    stored = _stored_tree(path, what,
                          lambda: checkpointer.metadata(path).item_metadata[_STATE].tree)
    try:
        return _restore_train(path, like, stored,
                              lambda args: checkpointer.restore(path, args=args))
    finally:
        checkpointer.close()


class TrainCheckpoints:
    """Every-N-steps resume points of one stage in ``directory/<step>/`` (Orbax
    ``CheckpointManager``): saves are asynchronous (the next steps run while the files are
    written), the last ``max_to_keep`` complete ones are kept, and a checkpoint cut short by a
    crash is never listed."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                 enable_async_checkpointing=True),
            item_handlers=_item_handlers(),
        )

    def save(self, point: ResumePoint) -> None:
        """Starts writing ``point`` as ``directory/<point.state.step>``; returns once the
        arrays are copied off the devices (so the next step may take their buffers), before
        the files are written."""
        self._manager.save(int(point.state.step), args=_train_args(point))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, like: TrainState, step: int | None = None) -> ResumePoint:
        """The resume point at ``step`` (default: the latest complete one), on ``like``'s
        shardings (``load_train_state``)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete train-state checkpoint in {self.directory}")
        path = self.directory / str(step)
        stored = _stored_tree(path, "train-state checkpoint",
                              lambda: self._manager.item_metadata(step)[_STATE].tree)
        return _restore_train(path, like, stored,
                              lambda args: self._manager.restore(step, args=args))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


# -------------------------------------------------------------------------------------- JSON


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> None:
    """Atomic JSON write (a temporary file in the same directory, then a rename), by process 0
    only; other processes that read it must pass a ``distributed.barrier`` first."""
    distributed.write_json(path, obj, sort_keys=sort_keys)


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
