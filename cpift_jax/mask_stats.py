"""Checking, statistics and storage of core masks: the mask validator, overlap counts, Jaccard,
density, bit packing.

Every statistic comes from one count, ``pair_counts``: for N masks, the N x N matrix of
intersection sizes ``|A_i & A_j|`` (diagonal: ``|A_i|``), leaf by leaf. From it

    jaccard(A_i, A_j) = |A_i & A_j| / (|A_i| + |A_j| - |A_i & A_j|)   (1.0 when both are empty)
    density(A)       = |A| / size.

Where the counts are taken. Host masks (NumPy arrays, ``jax.Array``s on one CPU device) are
counted by NumPy, pairs as popcounts of AND-ed bit-packed words. Masks anywhere else (sharded
over a mesh, on an accelerator, spanning several processes) are counted where they live by one
small jitted reduction per leaf shape; only the counts come back, so no model-sized array is
gathered to the host. On device each leaf is summed in int32 over row chunks of fewer than 2^31
entries; chunks and leaves are added as Python ints, so counts are exact at any model size.

Storage. ``pack``/``unpack`` are host helpers: flat ``np.packbits`` bytes per leaf, for masks
that fit in one process. Sharded masks are stored as sharded bool arrays (Orbax writes each
process's shards, ``training.checkpoints``); ``pack`` refuses a mask leaf that spans devices of
another process and says so.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cpift_jax import sphere
from cpift_jax import tree as tree_lib

Pytree = Any

__all__ = ["check_mask", "pair_counts", "jaccard", "overlap_matrix", "density", "density_by",
           "density_by_group", "pack", "unpack"]

_CHUNK_LIMIT = 2**31 - 1  # entries one int32 sum may count


# ---------------------------------------------------------------------------------- checking


def _whole_leaf(leaf) -> bool:
    return leaf is None or isinstance(leaf, (bool, np.bool_))


def check_mask(params: Pytree | None, mask: Pytree, *, names: tuple[str, str] = ("params", "mask"),
               whole_leaves: bool = False) -> list:
    """The leaves of ``mask`` in ``params``' flatten order, checked; the one mask validator.

    Leaves are matched by leaf path (so a dict mask fits an ``nnx.State``); ``mask`` must hold
    exactly ``params``' paths, and each leaf must have its parameter's shape and dtype bool.
    ``whole_leaves=True`` also takes None or a Python bool for a whole leaf (returned as is).
    ``params=None`` checks the dtypes alone. ValueError naming the first offending leaf path.
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(mask, is_leaf=_whole_leaf if whole_leaves else None)
    by_path = {tree_lib.path_str(kp): leaf for kp, leaf in with_path}
    if params is None:
        paths, shapes = list(by_path), [None] * len(by_path)
    else:
        paths, p_leaves, _ = tree_lib.flatten(params)
        shapes = [tuple(np.shape(x)) for x in p_leaves]
        for path in sorted(set(paths) ^ set(by_path)):
            where = names[::-1] if path in by_path else names
            raise ValueError(f"leaf '{path}' is in {where[0]} but missing from {where[1]}")
    out = []
    for path, shape in zip(paths, shapes):
        leaf = by_path[path]
        if not (whole_leaves and _whole_leaf(leaf)):
            if shape is not None and tuple(np.shape(leaf)) != shape:
                raise ValueError(f"leaf '{path}': {names[0]} has shape {shape}, "
                                 f"{names[1]} has shape {tuple(np.shape(leaf))}")
            dtype = getattr(leaf, "dtype", None)
            if dtype != np.bool_:
                hint = " (a bit-packed mask? unpack it first)" if dtype == np.uint8 else ""
                raise ValueError(f"leaf '{path}': {names[1]} has dtype {dtype}, expected bool{hint}")
        out.append(leaf)
    return out


# ---------------------------------------------------------------------------------- counting


def _on_host(x) -> bool:
    """NumPy data, or a ``jax.Array`` on a single CPU device (read there without a copy)."""
    if not isinstance(x, jax.Array):
        return True
    devices = x.sharding.device_set
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def _row_chunks(path: str, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` slices along axis 0 with fewer than 2^31 entries each."""
    size = math.prod(shape)
    if size <= _CHUNK_LIMIT or not shape:
        return ((0, shape[0] if shape else 0),)
    row = math.prod(shape[1:])
    if row > _CHUNK_LIMIT:
        raise ValueError(f"mask leaf '{path}': one slice along axis 0 of shape {shape} has {row} "
                         f"entries; counts on device need fewer than 2^31 per slice")
    step = _CHUNK_LIMIT // row
    return tuple((start, min(start + step, shape[0])) for start in range(0, shape[0], step))


@functools.partial(jax.jit, static_argnames="chunks")
def _device_pair_counts(leaves: tuple, chunks: tuple) -> jax.Array:
    """int32 ``|a_i & a_j|`` per row chunk and pair ``sphere.pairs(n)``: shape (chunks, pairs).
    Sharded leaves are summed where their shards live; jit adds the cross-device sums."""
    out = []
    for start, stop in chunks:
        part = [x[start:stop] if len(chunks) > 1 else x for x in leaves]
        out.append(jnp.stack([jnp.sum(part[i] & part[j], dtype=jnp.int32)
                              for i, j in sphere.pairs(len(part))]))
    return jnp.stack(out)


def _host_pair_counts(leaves: list) -> list[int]:
    flat = [np.asarray(x).reshape(-1) for x in leaves]
    if len(flat) == 1:
        return [int(np.count_nonzero(flat[0]))]
    words = []
    for x in flat:  # bool -> uint64 words, 8 entries per byte, zero-padded
        packed = np.packbits(x)
        words.append(np.concatenate([packed, np.zeros(-packed.size % 8, np.uint8)]).view(np.uint64))
    return [int(np.bitwise_count(words[i] & words[j]).sum()) for i, j in sphere.pairs(len(words))]


def _as_matrix(pair_sums: Sequence[int], n: int) -> np.ndarray:
    out = np.zeros((n, n), np.int64)
    for (i, j), c in zip(sphere.pairs(n), pair_sums):
        out[i, j] = out[j, i] = c
    return out


def pair_counts(paths: Sequence[str], per_leaf: Sequence[Sequence]) -> list[np.ndarray]:
    """Per leaf, the int64 matrix ``|A_i & A_j|`` of its N bool arrays ``per_leaf[leaf]``.

    Host leaves are counted by NumPy; any other leaf by a jitted reduction where it lives (all
    such leaves are dispatched before the first count is read back)."""
    pending = []
    for path, leaves in zip(paths, per_leaf):
        leaves = list(leaves)
        if all(_on_host(x) for x in leaves):
            pending.append(_host_pair_counts(leaves))
        else:
            chunks = _row_chunks(path, tuple(np.shape(leaves[0])))
            pending.append(_device_pair_counts(tuple(leaves), chunks))
    out = []
    for leaves, counts in zip(per_leaf, pending):
        if isinstance(counts, jax.Array):  # (chunks, pairs) int32, replicated: sum as int64
            counts = np.asarray(counts).astype(np.int64).sum(axis=0).tolist()
        out.append(_as_matrix(counts, len(leaves)))
    return out


def _bool_leaves(mask: Pytree, name: str) -> tuple[list[str], list]:
    """Leaf paths and leaves of a bool pytree (dtypes checked by ``check_mask``)."""
    return tree_lib.leaf_paths(mask), check_mask(None, mask, names=(name, name))


def _leaf_counts(mask: Pytree, name: str) -> tuple[list[str], list[int], list[int]]:
    """(leaf paths, True entries per leaf, entries per leaf)."""
    paths, leaves = _bool_leaves(mask, name)
    counts = [int(m[0, 0]) for m in pair_counts(paths, [[x] for x in leaves])]
    return paths, counts, [math.prod(np.shape(x)) for x in leaves]


# ------------------------------------------------------------------------------------ overlap


def _overlap(masks: Sequence[Pytree], names: Sequence[str]) -> np.ndarray:
    for name, m in zip(names[1:], masks[1:]):
        tree_lib.check_same_shapes(masks[0], m, names=(names[0], name))
    per_mask = [_bool_leaves(m, name) for m, name in zip(masks, names)]
    paths = per_mask[0][0]
    inter = sum(pair_counts(paths, list(zip(*(leaves for _, leaves in per_mask)))),
                np.zeros((len(masks),) * 2, np.int64))
    sizes = np.diag(inter)
    union = sizes[:, None] + sizes[None, :] - inter
    out = np.ones(inter.shape, np.float64)  # two empty masks: identical sets
    np.divide(inter, union, out=out, where=union > 0)
    return out


def jaccard(mask_a: Pytree, mask_b: Pytree) -> float:
    """``|A & B| / |A | B|`` over all leaves; 1.0 when both masks are empty (identical sets)."""
    return float(_overlap([mask_a, mask_b], ("mask_a", "mask_b"))[0, 1])


def overlap_matrix(masks: Sequence[Pytree]) -> np.ndarray:
    """Pairwise Jaccard matrix (N, N) float64 (``jaccard`` of every pair); symmetric, diagonal 1.

    Host masks: popcounts of bit-packed words, leaf by leaf (N packed copies of one leaf at a
    time); device masks: counted where they live (module docstring).
    """
    masks = list(masks)
    if not masks:
        raise ValueError("overlap_matrix: need at least one mask")
    return _overlap(masks, [f"masks[{i}]" for i in range(len(masks))])


# ------------------------------------------------------------------------------------ density


def density(mask: Pytree) -> dict:
    """``{"per_leaf": {path: fraction True}, "total": fraction True, "count": int}``.

    Empty leaves (size 0) have density 0.0.
    """
    paths, counts, sizes = _leaf_counts(mask, "mask")
    total = sum(sizes)
    return {
        "per_leaf": {p: c / s if s else 0.0 for p, c, s in zip(paths, counts, sizes)},
        "total": sum(counts) / total if total else 0.0,
        "count": sum(counts),
    }


def density_by_group(mask: Pytree, key_fn: Callable[[str], Hashable]) -> dict:
    """Density per group of leaves: ``{key_fn(path): {"count", "size", "density"}}``.

    Every leaf lands in the group ``key_fn`` returns for its path (None is a group like any
    other). Groups appear in order of first leaf. E.g. ``density_by_group(m,
    tree.layer_index)`` for per-layer densities.
    """
    groups: dict = {}
    for path, count, size in zip(*_leaf_counts(mask, "mask")):
        g = groups.setdefault(key_fn(path), {"count": 0, "size": 0})
        g["count"] += count
        g["size"] += size
    for g in groups.values():
        g["density"] = g["count"] / g["size"] if g["size"] else 0.0
    return groups


def density_by(mask: Pytree, rules: Sequence[tuple[str, Hashable]]) -> dict:
    """``density_by_group`` with groups from ordered ``(regex, group)`` rules.

    First ``re.fullmatch`` wins and every leaf must match a rule (``tree.resolve_rules``), e.g.
    ``[(r".*attn.*", "attention"), (r".*mlp.*", "mlp"), (r".*", "other")]``.
    """
    rules = list(rules)
    tree_lib.resolve_rules(mask, rules)  # checks the regexes and that every leaf is covered
    return density_by_group(mask, lambda path: tree_lib.match_rule(path, rules))


# ------------------------------------------------------------------------------------ storage


def pack(mask: Pytree) -> Pytree:
    """Bool pytree -> pytree of uint8 NumPy arrays, 8 entries per byte (``np.packbits`` order).

    A host helper: each leaf is read into this process, flattened row-major and packed to
    ``ceil(size / 8)`` bytes; the shapes are not stored (``unpack`` takes them from ``like``).
    A leaf spanning devices of other processes raises ValueError naming it: store sharded masks
    as bool arrays with Orbax instead (module docstring).
    """
    paths, leaves = _bool_leaves(mask, "mask")
    for path, leaf in zip(paths, leaves):
        if getattr(leaf, "is_fully_addressable", True) is False:
            raise ValueError(f"pack: mask leaf '{path}' spans devices of other processes; pack is a "
                             f"host helper: store sharded masks as bool arrays (Orbax) instead")
    treedef = jax.tree_util.tree_structure(mask)
    return jax.tree_util.tree_unflatten(
        treedef, [np.packbits(np.asarray(leaf).reshape(-1)) for leaf in leaves])


def unpack(packed: Pytree, like: Pytree) -> Pytree:
    """Inverse of ``pack``: bool arrays with the structure and shapes of ``like``.

    ``like`` holds arrays or ``jax.ShapeDtypeStruct``s; a leaf of ``like`` with a sharding (a
    ``jax.Array``, or a ``ShapeDtypeStruct`` given one) gets its mask placed with that sharding,
    any other leaf a NumPy array. Leaves are matched by path, so a packed tree restored as a
    plain dict unpacks against an ``nnx.State``. ValueError names the first leaf that is
    missing, extra, not uint8, or of the wrong byte length for its shape.
    """
    p_paths, p_leaves, _ = tree_lib.flatten(packed)
    l_paths, l_leaves, treedef = tree_lib.flatten(like)
    by_path = dict(zip(p_paths, p_leaves))
    for path in sorted(set(p_paths) ^ set(l_paths)):
        where = "packed" if path in by_path else "like"
        raise ValueError(f"unpack: leaf '{path}' is only in {where}")
    out = []
    for path, ref in zip(l_paths, l_leaves):
        shape = tuple(np.shape(ref))
        size = math.prod(shape)
        data = np.asarray(by_path[path])
        if data.dtype != np.uint8 or data.ndim != 1 or data.size != -(-size // 8):
            raise ValueError(
                f"unpack: leaf '{path}': expected {-(-size // 8)} packed uint8 bytes for shape "
                f"{shape}, got {data.dtype} array of shape {data.shape}"
            )
        mask = np.unpackbits(data, count=size).astype(bool).reshape(shape)
        sharding = getattr(ref, "sharding", None)
        out.append(mask if sharding is None else jax.device_put(mask, sharding))
    return jax.tree_util.tree_unflatten(treedef, out)
