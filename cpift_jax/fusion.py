"""CPI fusion: transplant each task's core entries, merge the other entries across the tasks.

Step 4 of CPI-FT (arXiv 2508.21741). Given a backbone, task models theta_1..theta_n (probe
fine-tunes of one base) and their core masks C_1..C_n (bool pytrees, ``masks.core_mask``), with
U = C_1 | ... | C_n:

    fused[e] = core value at e                          if e is in U
    fused[e] = merge(theta_1, ..., theta_n)[e]          otherwise

Core value where cores overlap (``overlap``; an entry in one core simply takes that task's value):
- ``"max_delta"`` (default): the task with the largest |theta_i - backbone| there, ties to the
  lowest task index (the task that moved the entry most owns it);
- ``"mean"``: the mean of the overlapping tasks' values;
- ``"first"``: the lowest task index.
Every entry comes from a core or from the merge, so the backbone's own values never appear: it
is read only by ``"max_delta"`` and passed as ``base=`` to operators other than SLERP.

Non-core merge: operator ``merge`` of ``cpift_jax.merges`` with ``**merge_kwargs``.
- ``"slerp"`` (default) equals ``slerp.merge(tuned_models, mask=~U, **merge_kwargs)`` on the
  non-core entries: norms and cosines are taken over the non-core entries only, so the cores'
  large updates do not tilt the angle. It runs in the kernel below (all slerp options: ``t``,
  ``weights``, ``mode``, ``granularity``, ``eps``, ``dot_threshold``).
- Other operators merge whole leaves with ``base=backbone`` (and ``mask=~U`` if their ``merge``
  takes a ``mask``); their non-core entries are kept.

Kernel (per leaf, one jitted program, float32 math): pass 1 is one fused row reduction giving
the Gram matrix of the task models over the non-core entries (and the report's counts); the
whole SLERP fold is a linear combination sum_i c_i theta_i whose coefficients follow from that
Gram matrix (``slerp.fold_coefficients``); pass 2 writes c . theta or the core value in one
elementwise sweep. ``donate_backbone=True`` lets pass 2 write into the backbone's buffers (the
backbone arrays are deleted): a fresh output costs page faults, ~0.5 s per GiB on CPU.
With ``mesh`` (one axis) each device handles a block of rows of every leaf whose leading
dimension is a multiple of the device count; partial sums are combined with one ``psum`` per
leaf (see ``cpift_jax.fusion_layout``). Results equal the single-device ones to float32 rounding.

Report (JSON-serialisable Python ints): ``total_params``; ``core_union`` = |U|;
``merged_entries`` = total - |U|; ``core_sizes`` |C_i|; ``pairwise_overlap`` |C_i & C_j|
(diagonal = core sizes); ``overlap_entries`` (entries in >= 2 cores); ``transplanted`` (entries
whose value came from task i; with ``"mean"`` every task of an overlapping entry counts, so
these are the core sizes); plus ``num_tasks``, ``merge`` and ``overlap_rule``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import inspect
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import shard_map
from jax.sharding import Mesh, PartitionSpec

from cpift_jax import host
from cpift_jax import merges
from cpift_jax import fusion_layout
from cpift_jax import tree as tree_lib
from cpift_jax.merges import slerp as slerp_lib
from cpift_jax.merges._common import row_sums

__all__ = ["fuse", "fuse_leafwise", "check_overlap", "OVERLAP_RULES"]

Pytree = Any
OVERLAP_RULES = ("max_delta", "mean", "first")
_SLERP_OPTIONS = ("t", "weights", "mode", "granularity", "eps", "dot_threshold")
_FUSE_OWNED = ("mask", "base")  # fuse passes these to the operator itself
_MAX_LEAF = 2**31 - 1  # counts are int32 per leaf


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one leaf program (the jit cache key)."""

    n: int
    rule: str
    slerp: bool  # merge in the kernel (SLERP) or take an operator's merged leaf
    rows: bool  # SLERP per row
    eps: float
    dot_threshold: float
    parts: int  # devices the leaf is split over; 1 = unsharded
    axis: str | None


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i, n)]


def _core_choice(bf, xf, ms, rule: str):
    """(core value, winning task index or None) per entry; meaningless outside every core."""
    if rule == "mean":
        total = sum(jnp.where(m, x, 0.0) for m, x in zip(ms, xf))
        count = sum(m.astype(jnp.float32) for m in ms)
        return total / jnp.maximum(count, 1.0), None
    if rule == "first":
        value, winner = xf[-1], jnp.int32(-1)
        for i in reversed(range(len(xf))):
            value, winner = jnp.where(ms[i], xf[i], value), jnp.where(ms[i], i, winner)
        return value, winner
    # max_delta: strictly larger |delta| takes over, so ties stay with the lower index.
    value, best, winner = xf[0], jnp.where(ms[0], jnp.abs(xf[0] - bf), -1.0), jnp.where(ms[0], 0, -1)
    for i in range(1, len(xf)):
        delta = jnp.abs(xf[i] - bf)
        take = ms[i] & (delta > best)
        value = jnp.where(take, xf[i], value)
        best = jnp.where(take, delta, best)
        winner = jnp.where(take, i, winner)
    return value, winner


def _stats(b2, xs2, ms2, *, plan: _Plan):
    """Pass 1 over one leaf's (rows, cols) view: (Gram matrix of the task models over the
    non-core entries, or None; int32 counts [pairs i<=j, union, >=2 cores, winners])."""
    n = plan.n
    bf, xf = b2.astype(jnp.float32), [x.astype(jnp.float32) for x in xs2]
    union = functools.reduce(operator.or_, ms2)
    pairs = _pairs(n)
    floats = []
    if plan.slerp:
        z = [jnp.where(union, 0.0, x) for x in xf]
        floats = [z[i] * z[j] for i, j in pairs]
    # Every count is one more output of the fused reduction, so counts that follow from others
    # are derived after it: with two tasks |U| = |C_0| + |C_1| - |C_0 & C_1| and the entries in
    # >= 2 cores are C_0 & C_1; task 0 wins the entries of U no other task wins.
    as_int = lambda m: m.astype(jnp.int32)  # noqa: E731
    ints = [as_int(ms2[i] & ms2[j]) for i, j in pairs]
    if n > 2:
        in_cores = sum(as_int(m) for m in ms2)
        ints += [as_int(in_cores >= 1), as_int(in_cores >= 2)]
    if plan.rule != "mean":
        _, winner = _core_choice(bf, xf, ms2, plan.rule)
        ints += [as_int(winner == i) for i in range(1, n)]

    # One read of the inputs for every product and count (see _common.row_sums).
    sums = row_sums(floats + ints)
    totals = [jnp.sum(s) for s in sums[len(floats):]]
    p, rest = totals[: len(pairs)], totals[len(pairs):]
    if n == 1:
        union_multi = [p[0], jnp.zeros_like(p[0])]
    elif n == 2:
        union_multi = [p[0] + p[2] - p[1], p[1]]
    else:
        union_multi, rest = rest[:2], rest[2:]
    winners = [union_multi[0] - sum(rest, jnp.zeros_like(p[0]))] + rest if plan.rule != "mean" else []
    counts = jnp.stack(p + union_multi + winners)
    gram = None
    if plan.slerp:
        index = {pair: k for k, pair in enumerate(pairs)}
        gram = jnp.stack(
            [jnp.stack([sums[index[min(i, j), max(i, j)]] for j in range(n)], -1) for i in range(n)], -2
        )  # (rows, n, n)
        if not plan.rows:
            gram = jnp.sum(gram, axis=0)
    if plan.axis is not None:
        # One collective per leaf; per-row Gram matrices are already complete on each device.
        if plan.slerp and not plan.rows:
            gram, counts = jax.lax.psum((gram, counts), plan.axis)
        else:
            counts = jax.lax.psum(counts, plan.axis)
    return gram, counts


def _apply(b2, xs2, ms2, extra, gram, *, plan: _Plan):
    """Pass 2: core value on U, else sum_i c_i theta_i (SLERP) or the operator's merged leaf."""
    n = plan.n
    bf, xf = b2.astype(jnp.float32), [x.astype(jnp.float32) for x in xs2]
    if plan.slerp:
        coeffs = slerp_lib.fold_coefficients(gram, extra, eps=plan.eps, dot_threshold=plan.dot_threshold)
        coeffs = coeffs[:, :, None] if plan.rows else coeffs[None, :, None]  # (rows|1, n, 1)
        merged = sum(coeffs[:, i] * xf[i] for i in range(n))
    else:
        merged = extra.astype(jnp.float32)
    core, _ = _core_choice(bf, xf, ms2, plan.rule)
    union = functools.reduce(operator.or_, ms2)
    return jnp.where(union, core, merged).astype(b2.dtype)


# XLA:CPU's newer fusion emitters run this many-output float reduction as a scalar loop
# (float adds are not reassociated); the classic emitter vectorises it, ~4x faster here. The
# elementwise pass is faster with the default, hence two programs per leaf.
_STATS_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def _compiler_options(platform: str) -> dict:
    return dict(_STATS_OPTIONS) if platform == "cpu" and _STATS_OPTIONS_OK[0] else {}


_STATS_OPTIONS_OK = [True]  # flipped off if this XLA build no longer knows the option


@functools.lru_cache(maxsize=None)
def _compiled(plan: _Plan, mesh: Mesh | None, donate: bool, platform: str):
    """(stats, apply) jitted for ``plan``; jax.jit adds one compilation per leaf shape."""
    stats = functools.partial(_stats, plan=plan)
    apply = functools.partial(_apply, plan=plan)
    if mesh is not None:
        rows, whole = PartitionSpec(plan.axis), PartitionSpec()
        gram_spec = rows if plan.rows else whole
        data = (rows, (rows,) * plan.n, (rows,) * plan.n)
        stats = shard_map(stats, mesh=mesh, in_specs=data,
                          out_specs=(gram_spec if plan.slerp else whole, whole))
        apply = shard_map(apply, mesh=mesh, in_specs=data + (whole if plan.slerp else rows, gram_spec),
                          out_specs=rows)

    def views(backbone, xs, ms):
        view = fusion_layout.row_view(backbone.shape, plan.parts)
        as_view = lambda x: x.reshape(view)  # noqa: E731  (a free bitcast inside the jit)
        return as_view(backbone), tuple(map(as_view, xs)), tuple(map(as_view, ms)), as_view

    def run_stats(backbone, xs, ms):
        return stats(*views(backbone, xs, ms)[:3])

    def run_apply(backbone, xs, ms, extra, gram):
        b2, xs2, ms2, as_view = views(backbone, xs, ms)
        out = apply(b2, xs2, ms2, extra if plan.slerp else as_view(extra), gram)
        return out.reshape(backbone.shape)

    return (
        jax.jit(run_stats, compiler_options=_compiler_options(platform)),
        # keep_unused: rules that never read the backbone ("first", "mean") would otherwise
        # drop it from the program, so its donated buffer could not hold the output and pass 2
        # would write a fresh one (page faults: 2x slower on CPU).
        jax.jit(run_apply, donate_argnums=(0,) if donate else (), keep_unused=donate),
    )


@functools.lru_cache(maxsize=None)
def _compiled_block_stats(plan: _Plan, rows: int, platform: str):
    """Pass 1 over ``rows`` rows of the (rows, cols) view starting at a traced row ``start``:
    the slice is fused into the reduction (no copy)."""

    def run(start, backbone, xs, ms):
        view = fusion_layout.row_view(backbone.shape)
        block = lambda x: jax.lax.dynamic_slice_in_dim(x.reshape(view), start, rows)  # noqa: E731
        return _stats(block(backbone), tuple(map(block, xs)), tuple(map(block, ms)), plan=plan)

    return jax.jit(run, compiler_options=_compiler_options(platform))


def _platform(x) -> str:
    """The platform a leaf lives on (host arrays count as CPU)."""
    return next(iter(x.devices())).platform if isinstance(x, jax.Array) else "cpu"


def _with_option_fallback(call):
    """``call()``, retried without the CPU compiler option if this XLA build rejects it."""
    try:
        return call()
    except jax.errors.JaxRuntimeError as err:
        if "compile option" not in str(err) or not _STATS_OPTIONS_OK[0]:
            raise
        _STATS_OPTIONS_OK[0] = False
        _compiled.cache_clear()
        _compiled_block_stats.cache_clear()
        return call()


# XLA:CPU runs pass 1's reduction on one thread; leaves of at least this many entries are cut
# into row blocks whose reductions run in parallel threads (measured 1.6x on two cores).
_BLOCK_MIN_ENTRIES = 1 << 20
_STATS_THREADS = host.usable_cpus()
_STATS_POOL = host.thread_pool()


def _submit_stats(plan, mesh, donate, args) -> list[concurrent.futures.Future]:
    """Pass 1 of one leaf as futures of (gram, counts), one per row block (in row order)."""
    backbone, xs, ms, _ = args
    platform = _platform(backbone)
    rows = fusion_layout.row_view(np.shape(backbone), plan.parts)[0]
    threads = _STATS_THREADS
    if mesh is not None or platform != "cpu" or threads < 2 or np.size(backbone) < _BLOCK_MIN_ENTRIES \
            or rows < threads:
        stats = _compiled(plan, mesh, donate, platform)[0]
        return [_STATS_POOL.submit(_with_option_fallback, lambda: stats(backbone, xs, ms))]
    # Each thread waits for its block: XLA:CPU would otherwise queue the blocks one after another.
    size = -(-rows // threads)
    futures = []
    for start in range(0, rows, size):
        count = min(size, rows - start)
        call = lambda start=start, count=count: jax.block_until_ready(  # noqa: E731
            _compiled_block_stats(plan, count, platform)(np.int32(start), backbone, xs, ms))
        futures.append(_STATS_POOL.submit(_with_option_fallback, call))
    return futures


def _finish_leaf(plan, mesh, donate, args, stats_futures):
    """Pass 2 of one leaf once its pass 1 is done: (fused leaf, counts)."""
    backbone, xs, ms, extra = args
    parts = [f.result() for f in stats_futures]
    counts = functools.reduce(operator.add, [c for _, c in parts])
    gram = None
    if plan.slerp:
        grams = [g for g, _ in parts]
        gram = jnp.concatenate(grams) if plan.rows else functools.reduce(operator.add, grams)
    apply = _compiled(plan, mesh, donate, _platform(backbone))[1]
    return apply(backbone, xs, ms, extra, gram), counts


def check_overlap(overlap: str) -> None:
    """Raises ``ValueError`` listing the rules unless ``overlap`` is one of ``OVERLAP_RULES``."""
    if overlap not in OVERLAP_RULES:
        raise ValueError(f"unknown overlap rule {overlap!r}; available: {', '.join(OVERLAP_RULES)}")


def _check_inputs(backbone, tuned_models, core_masks, overlap: str) -> int:
    for name, value in (("tuned_models", tuned_models), ("core_masks", core_masks)):
        if isinstance(value, dict) or not isinstance(value, Sequence):
            raise ValueError(f"{name} must be a list of pytrees, got {type(value).__name__}")
    if not tuned_models:
        raise ValueError("tuned_models is empty: fuse needs at least one task model")
    if len(core_masks) != len(tuned_models):
        raise ValueError(f"got {len(core_masks)} core_masks for {len(tuned_models)} tuned_models")
    check_overlap(overlap)
    for i, model in enumerate(tuned_models):
        tree_lib.check_same_structure(backbone, model, names=("backbone", f"tuned_models[{i}]"))
    paths, leaves, _ = tree_lib.flatten(backbone)
    for path, leaf in zip(paths, leaves):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(f"leaf '{path}' has dtype {jnp.result_type(leaf)}; fuse needs floating leaves")
        if np.size(leaf) > _MAX_LEAF:
            raise ValueError(f"leaf '{path}' has {np.size(leaf)} entries; at most {_MAX_LEAF} supported")
    for i, mask in enumerate(core_masks):
        tree_lib.check_same_shapes(backbone, mask, names=("backbone", f"core_masks[{i}]"))
        for path, leaf in zip(*tree_lib.flatten(mask)[:2]):
            if jnp.result_type(leaf) != jnp.bool_:
                raise ValueError(f"core_masks[{i}] leaf '{path}' must be bool, got {jnp.result_type(leaf)}")
    return len(tuned_models)


def _slerp_settings(merge_kwargs: dict, n: int, paths: list[str]):
    """(granularity, eps, dot_threshold, per-leaf float32 fold steps) from SLERP's options."""
    unknown = sorted(set(merge_kwargs) - set(_SLERP_OPTIONS))
    if unknown:
        raise TypeError(f"unknown slerp option(s) {unknown}; slerp takes {', '.join(_SLERP_OPTIONS)}")
    defaults = {k: p.default for k, p in inspect.signature(slerp_lib.merge).parameters.items()}
    opts = {k: merge_kwargs.get(k, defaults[k]) for k in _SLERP_OPTIONS}
    if opts["mode"] not in slerp_lib.MODES:
        raise ValueError(f"mode must be one of {slerp_lib.MODES}, got {opts['mode']!r}")
    if opts["granularity"] not in slerp_lib.GRANULARITIES:
        raise ValueError(f"granularity must be one of {slerp_lib.GRANULARITIES}, got {opts['granularity']!r}")
    schedule = slerp_lib.fold_schedule(n, paths, t=opts["t"], weights=opts["weights"])
    # NumPy, not jnp: eager jnp ops cost ~1 ms of dispatch per leaf, more than a small leaf's kernel.
    steps = [np.asarray([np.float32(t) for t in ts], np.float32) for ts in schedule]
    return opts["granularity"], float(opts["eps"]), float(opts["dot_threshold"]), steps


def _operator_merge(name: str, backbone, tuned_models, core_masks, merge_kwargs: dict):
    """Whole-leaf merge by a registry operator (mask=~U for operators that take a mask)."""
    fn = merges.get(name)
    kwargs = dict(merge_kwargs)
    if "mask" in inspect.signature(fn).parameters:
        kwargs["mask"] = jax.tree.map(lambda *ms: ~functools.reduce(operator.or_, ms), *core_masks)
    return fn(list(tuned_models), base=backbone, **kwargs)


def fuse_leafwise(backbone, tuned_models, core_masks, *, merge: str = "slerp",
                  overlap: str = "max_delta", **merge_kwargs):
    """``fuse`` from whole-leaf jittable parts, for traced inputs (``fuse`` dispatches its
    precompiled kernels and builds its report in NumPy): the registry operator ``merge`` on the
    non-core entries (``mask=~U`` where it takes one), then the overlap rule on U. No report, no
    mesh; values equal ``fuse``'s to float32 rounding."""
    n = _check_inputs(backbone, tuned_models, core_masks, overlap)
    merged = _operator_merge(merge, backbone, tuned_models, core_masks, merge_kwargs)

    def leaf(b, m, *rest):
        xs, ms = rest[:n], rest[n:]
        core, _ = _core_choice(b.astype(jnp.float32), [x.astype(jnp.float32) for x in xs], ms,
                               overlap)
        union = functools.reduce(operator.or_, ms)
        return jnp.where(union, core, m.astype(jnp.float32)).astype(b.dtype)

    return jax.tree.map(leaf, backbone, merged, *tuned_models, *core_masks)


def _report(counts: list, n: int, total: int, merge: str, overlap: str) -> dict:
    summed = np.sum([np.asarray(c, np.int64) for c in counts], axis=0) if counts else np.zeros(
        len(_pairs(n)) + 2 + (0 if overlap == "mean" else n), np.int64)
    pairs = _pairs(n)
    pairwise = [[0] * n for _ in range(n)]
    for k, (i, j) in enumerate(pairs):
        pairwise[i][j] = pairwise[j][i] = int(summed[k])
    union, multi = int(summed[len(pairs)]), int(summed[len(pairs) + 1])
    sizes = [pairwise[i][i] for i in range(n)]
    winners = sizes if overlap == "mean" else [int(c) for c in summed[len(pairs) + 2:]]
    return {
        "num_tasks": n,
        "merge": merge,
        "overlap_rule": overlap,
        "total_params": int(total),
        "core_union": union,
        "merged_entries": int(total) - union,
        "core_sizes": sizes,
        "transplanted": winners,
        "overlap_entries": multi,
        "pairwise_overlap": pairwise,
    }


def fuse(
    backbone: Pytree,
    tuned_models: Sequence[Pytree],
    core_masks: Sequence[Pytree],
    *,
    merge: str = "slerp",
    overlap: str = "max_delta",
    mesh: Mesh | None = None,
    donate_backbone: bool = False,
    **merge_kwargs,
) -> tuple[Pytree, dict]:
    """Fused parameters (backbone's structure and dtypes) and a report; see the module docstring.

    ``merge_kwargs`` go to the merge operator (``base`` and ``mask`` are set by fuse).
    """
    n = _check_inputs(backbone, tuned_models, core_masks, overlap)
    merges.get_module(merge)  # unknown names raise, listing what exists
    owned = sorted(set(merge_kwargs) & set(_FUSE_OWNED))
    if owned:
        raise ValueError(f"fuse sets {owned} for the merge operator itself; do not pass them")
    axis = fusion_layout.check_mesh(mesh) if mesh is not None else None
    paths, b_leaves, treedef = tree_lib.flatten(backbone)
    x_leaves = list(zip(*(jax.tree_util.tree_leaves(m) for m in tuned_models)))
    m_leaves = list(zip(*(jax.tree_util.tree_leaves(m) for m in core_masks)))

    if merge == "slerp":
        granularity, eps, threshold, extras = _slerp_settings(merge_kwargs, n, paths)
    else:
        granularity, eps, threshold = "leaf", 0.0, 0.0
        extras = jax.tree_util.tree_leaves(_operator_merge(merge, backbone, tuned_models, core_masks, merge_kwargs))

    total = sum(int(np.prod(np.shape(b))) for b in b_leaves)  # before any donation
    # Pass 1 of every leaf is queued at once (blocks of big leaves run in parallel threads);
    # pass 2 of each leaf follows in order as soon as its pass 1 is done.
    jobs = []
    for j in range(len(paths)):
        shape = np.shape(b_leaves[j])
        split = fusion_layout.is_sharded(shape, mesh)
        plan = _Plan(n=n, rule=overlap, slerp=merge == "slerp",
                     rows=granularity == "row" and len(shape) >= 2, eps=eps, dot_threshold=threshold,
                     parts=mesh.size if split else 1, axis=axis if split else None)
        args = [b_leaves[j], x_leaves[j], m_leaves[j], extras[j]]
        if mesh is not None:
            args = jax.tree.map(lambda x: fusion_layout.place(jnp.asarray(x), mesh, split), args[:3]) + [
                extras[j] if merge == "slerp" else fusion_layout.place(extras[j], mesh, split)]
        leaf_mesh = mesh if split else None
        jobs.append((plan, leaf_mesh, args, _submit_stats(plan, leaf_mesh, donate_backbone, args)))
    outs, counts = [], []
    for plan, leaf_mesh, args, stats_futures in jobs:
        out, leaf_counts = _finish_leaf(plan, leaf_mesh, donate_backbone, args, stats_futures)
        outs.append(out)
        counts.append(leaf_counts)
    return jax.tree_util.tree_unflatten(treedef, outs), _report(counts, n, total, merge, overlap)
