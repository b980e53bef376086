"""Core masks: element-wise bool pytrees marking each task's most-updated parameters.

A task's *core region* (CPI-FT, arXiv 2508.21741, Sec. 3.2) is the top ``p`` fraction of
individual scalar parameters by update magnitude ``|theta_task - theta_base|``, ranked once over
the whole model (``scope="global"``; the paper uses p = 1%) or, as an option, within each leaf.
This module builds those masks (``core_mask``). Checking them against parameters
(``check_mask``), their overlap (``jaccard``, ``overlap_matrix``), density (``density``,
``density_by``, ``density_by_group``) and host storage (``pack``, ``unpack``) live in
``cpift_jax.mask_stats`` and are re-exported here.

Where the masks are computed: host arrays (NumPy, one CPU device) by the host counting passes
(``select.top_k``); a model sharded over a mesh shard by shard under ``shard_map``, and a model
on one accelerator in plain ``jit``, both by the ``select_xla.leaf_*`` passes run leaf by leaf
(one compiled program per pass and leaf shape, whatever the depth), the NaN/Inf check reduced
on device to one flag per leaf. Thresholds come from ``cpift_jax.select.threshold``
(exact k-th largest by counting passes); it is re-exported here as ``masks.threshold``.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpift_jax import select_xla
from cpift_jax import tree as tree_lib
from cpift_jax.mask_stats import (
    check_mask, density, density_by, density_by_group, jaccard, overlap_matrix, pack, unpack,
)
from cpift_jax.select import NonFiniteScores, TopK, count_for_fraction, selected, threshold
from cpift_jax.select import top_k as select_top_k

Pytree = Any

__all__ = [
    "SCOPES",
    "threshold",
    "core_mask",
    "core_count",
    "leaves_mesh",
    "leaf_program",
    "check_mask",
    "jaccard",
    "overlap_matrix",
    "density",
    "density_by",
    "density_by_group",
    "pack",
    "unpack",
]

SCOPES = ("global", "leaf")


# ------------------------------------------------------------------------------------ building


# How many entries a fraction selects (floor, read as a decimal): the rule shared with the
# merge operators' trimming.
core_count = count_for_fraction


def _patterns(arg: str, value) -> list[re.Pattern]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"core_mask: {arg} must be a regex or a list of regexes, got {item!r}")
        try:
            out.append(re.compile(item))
        except re.error as err:
            raise ValueError(f"core_mask: invalid {arg} regex {item!r}: {err}") from None
    return out


def _eligible(paths: list[str], include, exclude) -> list[bool]:
    """Leaves that may hold core entries: some include pattern found, no exclude pattern found."""
    inc, exc = _patterns("include", include), _patterns("exclude", exclude)
    flags = [
        (not inc or any(p.search(path) for p in inc)) and not any(p.search(path) for p in exc)
        for path in paths
    ]
    if not any(flags):
        raise ValueError(
            f"core_mask: include={include!r} / exclude={exclude!r} leave no eligible leaf "
            f"(leaf paths: {paths[:6]}{'...' if len(paths) > 6 else ''})"
        )
    return flags


def _leaf_core(base: jax.Array, tuned: jax.Array, value, last) -> jax.Array:
    """The core mask of one leaf from its ``TopK`` cut, in one read of base and tuned."""
    return selected(jnp.abs(tuned.astype(jnp.float32) - base.astype(jnp.float32)), value, last)


_leaf_core_jit = jax.jit(_leaf_core)


def _leaf_masks(top: TopK, pairs: list[tuple]) -> list[jax.Array]:
    if top.masks is not None:
        return list(top.masks)
    out = []
    for j, (b, t) in enumerate(pairs):
        out.append(_leaf_core_jit(b, t, *top.leaf_cut(j)))
        # A jit call copies NumPy inputs into device buffers when it is dispatched; with every
        # leaf queued at once those copies would add up to both models. One leaf at a time
        # bounds them by the largest leaf's pair.
        if not isinstance(b, jax.Array) or not isinstance(t, jax.Array):
            out[j].block_until_ready()
    return out


def _concrete(x) -> bool:
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def leaves_mesh(named_leaves, caller: str) -> Mesh | None:
    """The mesh when some leaf is a ``jax.Array`` spanning several devices, else None.

    ``named_leaves``: ``(leaf path, role, leaf)`` triples (role: "base", "tuned", "core_masks[1]",
    ...). Once one leaf spans several devices, every leaf must be a ``jax.Array`` with a
    ``NamedSharding`` on that one mesh; ValueError naming the leaf and role otherwise.
    """
    named_leaves = list(named_leaves)
    if not any(_concrete(x) and len(x.sharding.device_set) > 1 for _, _, x in named_leaves):
        return None
    mesh = None
    for path, role, x in named_leaves:
        if not _concrete(x) or not isinstance(x.sharding, NamedSharding):
            raise ValueError(f"{caller}: leaf '{path}': {role} is not a jax.Array with a "
                             f"NamedSharding, while other leaves are sharded over a mesh")
        if mesh is None:
            mesh = x.sharding.mesh
        elif x.sharding.mesh != mesh:
            raise ValueError(f"{caller}: leaf '{path}': {role} lives on mesh {x.sharding.mesh}, "
                             f"other leaves on {mesh}; expected one mesh")
    return mesh


def _sharded_mesh(paths: list[str], pairs: list[tuple]):
    """The mesh when the leaves are sharded over several devices (``leaves_mesh``), else None;
    then base and tuned of each leaf must carry the same ``NamedSharding``."""
    mesh = leaves_mesh([(p, name, x) for p, pair in zip(paths, pairs)
                        for name, x in zip(("base", "tuned"), pair)], "core_mask")
    for path, (b, t) in zip(paths, pairs):
        if mesh is not None and b.sharding != t.sharding:
            raise ValueError(f"core_mask: leaf '{path}': base has sharding {b.sharding}, tuned "
                             f"has {t.sharding}; expected the same")
    return mesh


def _on_accelerator(pairs: list[tuple]) -> bool:
    """Concrete ``jax.Array``s, some of them on a device that is not the CPU."""
    leaves = [x for pair in pairs for x in pair]
    return all(_concrete(x) for x in leaves) and any(
        d.platform != "cpu" for x in leaves for d in x.sharding.device_set)


# The device path runs the passes of ``select_xla`` leaf by leaf: one small compiled program per
# (pass, leaf shape, dtypes, sharding), shared by every leaf alike (all layers of a model), so
# compile time does not grow with depth. Counts are summed across leaves on device; only the
# per-leaf NaN/Inf flags and the per-leaf (above, equal) counts come to the host, where the ties
# are handed out in Python ints.

_PASSES = {  # pass -> (select_xla function, number of replicated scalar arguments)
    "high": (select_xla.leaf_high_histogram, 0),
    "low": (select_xla.leaf_low_histogram, 1),
    "counts": (select_xla.leaf_above_and_equal, 1),
    "mask": (select_xla.leaf_mask, 2),
    "cut": (select_xla.leaf_mask_cut, 2),
}


@functools.lru_cache(maxsize=256)
def leaf_program(name: str, mesh, shape: tuple, dtypes: tuple, spec):
    """One pass over one leaf of ``shape``/``dtypes`` (base, tuned) laid out as ``spec`` on
    ``mesh`` (a ``shard_map`` whose counts are ``psum``-ed over the leaf's axes and returned
    replicated; masks keep the leaf's sharding), or on one device when ``mesh`` is None.
    ``dtypes`` is part of the key so that each cached program compiles once."""
    del dtypes
    fn, n_scalars = _PASSES[name]
    layout = select_xla.LeafLayout.from_spec(shape, spec if mesh is not None else PartitionSpec())

    def body(base, tuned, *scalars):
        return fn((base, tuned), layout, *scalars)

    body.__name__ = f"core_mask_{name}"
    if mesh is None:
        return jax.jit(body)
    is_mask = name in ("mask", "cut")
    out_spec = spec if is_mask else PartitionSpec()
    # out_shardings: masks carry the parameters' NamedShardings as given (shard_map alone would
    # report an equivalent, simplified spec, e.g. without size-1 axes).
    in_specs = (spec, spec) + (PartitionSpec(),) * n_scalars
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_spec),
                   out_shardings=NamedSharding(mesh, out_spec))


_count_add = jax.jit(select_xla.count_add)
_pick_digit = jax.jit(select_xla.pick_digit)
_digits_value = jax.jit(select_xla.digits_value)


def _count_value(c) -> int:
    """A replicated ``Count`` as a Python int (exact at any size)."""
    return int(np.asarray(c.hi)) * 65536 + int(np.asarray(c.lo))


def _split_ties(need: int, ties: list[int]) -> list[int]:
    """How many of its entries equal to the threshold each leaf takes: ``need`` of them in all,
    earliest leaves first (``min(ties[j], what is left)``); Python ints, exact at any size."""
    quotas = []
    for n in ties:
        quotas.append(min(n, need))
        need -= quotas[-1]
    if need:
        raise AssertionError(f"_split_ties: {need} entries equal to the threshold left over")
    return quotas


def _check_device_leaves(paths, pairs) -> None:
    for path, (b, _) in zip(paths, pairs):
        shard = int(np.prod(b.sharding.shard_shape(b.shape)))
        if shard >= select_xla.SHARD_LIMIT:
            raise ValueError(f"core_mask: leaf '{path}': {shard} entries in one shard; shards are "
                             f"counted in int32 (shard the leaf below 2^31 entries)")
        if b.size >= 2**32:
            raise ValueError(f"core_mask: leaf '{path}': {b.size} entries; tie positions are "
                             f"uint32 (leaves below 2^32 entries)")


def _device_top_k(mesh, paths: list[str], pairs: list[tuple], k: int) -> list[jax.Array]:
    """Core masks computed where the leaves live (sharded over ``mesh``, or on one device when
    it is None), one leaf at a time (``leaf_program``); masks keep the leaves' shardings."""
    if k == 0:
        return [jnp.zeros(b.shape, bool, device=b.sharding) for b, _ in pairs]
    _check_device_leaves(paths, pairs)
    scalar_sharding = (NamedSharding(mesh, PartitionSpec()) if mesh is not None
                       else pairs[0][0].sharding)

    def scalar(x, dtype):
        return jax.device_put(np.asarray(x, dtype), scalar_sharding)

    def count(n: int):
        return select_xla.Count(scalar(n >> 16, np.uint32), scalar(n & 0xFFFF, np.uint32))

    # XLA:CPU runs every device of a program on one shared thread pool, so several collective
    # programs in flight can starve each other's rendezvous (XLA aborts after 40 s): on CPU each
    # sharded pass finishes before the next is dispatched. Accelerators queue them per device.
    one_at_a_time = mesh is not None and all(d.platform == "cpu" for d in mesh.devices.flat)

    def run(name, j, *scalars):
        b, t = pairs[j]
        spec = b.sharding.spec if mesh is not None else None
        out = leaf_program(name, mesh, tuple(b.shape), (b.dtype, t.dtype), spec)(b, t, *scalars)
        return jax.block_until_ready(out) if one_at_a_time else out

    def summed(outputs):  # (Count, ...) per leaf -> the Counts' sum, the rest per leaf
        acc, rest = None, []
        for c, *more in outputs:  # a generator: each leaf's histogram is freed once added
            acc = c if acc is None else _count_add(acc, c)
            rest.append(more)
        return acc, rest

    leaves = range(len(pairs))
    hist, flags = summed(run("high", j) for j in leaves)
    for path, (bad,) in zip(paths, flags):
        if bool(np.asarray(bad)):
            raise ValueError(f"core_mask: leaf '{path}': |tuned - base| has NaN or Inf entries")
    high, rank = _pick_digit(hist, count(k))
    low, _ = _pick_digit(summed((run("low", j, high),) for j in leaves)[0], rank)
    v = _digits_value(high, low)
    outputs = [run("counts", j, v) for j in leaves]  # all dispatched before any is read
    counts = [(_count_value(above), _count_value(equal)) for above, equal in outputs]
    quotas = _split_ties(k - sum(above for above, _ in counts), [equal for _, equal in counts])
    masks_ = []
    for j, ((_, equal), quota) in enumerate(zip(counts, quotas)):
        if 0 < quota < equal:
            masks_.append(run("cut", j, v, count(quota)))
        else:
            masks_.append(run("mask", j, v, scalar(quota > 0, bool)))
    return masks_


def _top_k(paths: list[str], pairs: list[tuple], k: int, mesh=None) -> list[jax.Array]:
    if mesh is not None or _on_accelerator(pairs):
        return _device_top_k(mesh, paths, pairs, k)
    try:
        top = select_top_k(pairs, k, finite=True)
    except NonFiniteScores as err:
        raise ValueError(
            f"core_mask: leaf '{paths[err.leaf]}': |tuned - base| has NaN or Inf entries"
        ) from None
    return _leaf_masks(top, pairs)


def core_mask(
    base: Pytree,
    tuned: Pytree,
    fraction: float,
    scope: str = "global",
    *,
    include=None,
    exclude=None,
) -> Pytree:
    """True on the ``floor(fraction * D)`` entries with the largest ``|tuned - base|``.

    ``scope="global"`` ranks all D eligible scalars together (the paper's rule);
    ``scope="leaf"`` ranks within each eligible leaf (D = the leaf's size). Deltas are taken in
    float32 whatever the parameter dtype.

    Tie rule: exactly ``floor(fraction * D)`` entries are selected (0 gives an all-False mask,
    no error). Entries strictly above the threshold are all in; among entries equal to it the
    earliest in flatten order (jax.tree_util leaf order, then row-major index) are taken.

    Args:
      base, tuned: pytrees (dict, nnx.State, ...) of float arrays with identical structure,
        shapes and dtypes.
      fraction: in (0, 1], read as the decimal it prints as (``core_count``).
      scope: "global" or "leaf".
      include, exclude: a regex or list of regexes over leaf paths (``re.search``, so
        ``"embed"`` matches ``"model/embed_tokens/embedding"``). A leaf is eligible when some
        include pattern matches (all leaves if ``include`` is None) and no exclude pattern
        does; ineligible leaves get all-False masks and do not count in D.

    Sharded models: when the leaves are ``jax.Array``s spanning several devices (each with a
    ``NamedSharding`` on one mesh, base and tuned alike), the masks are computed where the
    shards live (the ``select_xla.leaf_*`` passes under ``shard_map``, one program per leaf
    shape: exact counts at any size, no host gather) and come back with the parameters'
    shardings; same masks as one device. A model on one accelerator runs the same passes
    without ``shard_map``.

    Returns:
      A bool pytree with the structure of ``base``.

    Raises:
      ValueError: fraction outside (0, 1]; unknown scope; base/tuned mismatch (names the leaf);
        non-float leaves; include/exclude leaving no eligible leaf; NaN or Inf in a delta
        (names the leaf; on device the check is reduced there and one flag per leaf is read).
        The NaN/Inf check needs concrete values, so under ``jit`` it is skipped:
        there a NaN delta makes the threshold NaN and the affected masks all-False, and an
        Inf delta ranks as the largest.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)):
        raise ValueError(f"core_mask: fraction must be a number in (0, 1], got {fraction!r}")
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"core_mask: fraction must be in (0, 1], got {fraction!r}")
    if scope not in SCOPES:
        raise ValueError(f"core_mask: scope must be one of {SCOPES}, got {scope!r}")
    tree_lib.check_same_structure(base, tuned, names=("base", "tuned"))
    paths, base_leaves, treedef = tree_lib.flatten(base)
    tuned_leaves = tree_lib.flatten(tuned)[1]
    for path, leaf in zip(paths, base_leaves):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(f"core_mask: leaf '{path}' has dtype {leaf.dtype}, expected float")
    eligible = _eligible(paths, include, exclude)
    index = [i for i, ok in enumerate(eligible) if ok]
    pairs = [(base_leaves[i], tuned_leaves[i]) for i in index]
    names = [paths[i] for i in index]
    mesh = _sharded_mesh(names, pairs)
    if scope == "global":
        total = sum(int(np.size(b)) for b, _ in pairs)
        chosen = _top_k(names, pairs, core_count(fraction, total), mesh)
    else:
        chosen = [_top_k([name], [pair], core_count(fraction, int(np.size(pair[0]))), mesh)[0]
                  for name, pair in zip(names, pairs)]

    def no_core(leaf):  # sharded like its parameter where it has a sharding
        sharding = getattr(leaf, "sharding", None) if mesh is not None else None
        return jnp.zeros(np.shape(leaf), bool, device=sharding)

    by_index = dict(zip(index, chosen))  # all-False leaves only where no mask was computed
    out = [by_index[i] if i in by_index else no_core(leaf) for i, leaf in enumerate(base_leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)
