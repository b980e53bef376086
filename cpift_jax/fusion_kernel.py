"""CPI fusion's host backend: a two-pass kernel per leaf, tuned for XLA:CPU, optionally on a 1-D mesh.

``fusion.fuse_leafwise`` defines the fused values; ``fusion.fuse`` runs this kernel for host
arrays and a mesh, and tests hold the two equal. Per leaf, on its 2-D *row view*:

- pass 1, one fused row reduction: the Gram matrix <theta_i, theta_j> of the task models over
  the non-core entries (SLERP only) and every report count (pairwise core overlaps, |U|, the
  entries in >= 2 cores, the winners of the overlap rule);
- between the passes, the whole SLERP fold as coefficients c from that Gram matrix
  (``sphere.fold_coefficients``): fold(theta_1..theta_n) = sum_i c_i theta_i;
- pass 2, one elementwise sweep: the core value (``transplant.core_value``) on U, else
  c . theta (SLERP) or the operator's merged leaf.

``donate=True`` lets pass 2 write into the backbone's buffers (a fresh output costs page faults,
~0.5 s per GiB on CPU). Tuning for XLA:CPU: pass 1 of a big leaf runs as row blocks in threads
(``row_blocks``: XLA runs one reduction on one thread), and pass 1 is compiled with the classic
CPU emitters when this XLA accepts the option (checked once, at first use; see
``host.reduction_compiler_options``).

Row view ``(rows, cols)`` of a leaf's entries: ``row_blocks.row_view`` (per-row partial sums
are short float32 accumulations; ``parts`` = devices the leaf is split over, 1 without a mesh).

On a mesh (one axis, D devices) a leaf whose leading dimension is a multiple of D is split into
contiguous blocks of whole rows, the same blocks as ``NamedSharding(mesh, P(axis))``, so the row
view needs no communication; partial sums are combined with one ``psum`` per leaf. Other leaves
(odd leading sizes, scalars: normally norm scales and biases) are replicated over the mesh.
Results equal the single-device ones to float32 rounding.

Leaves already sharded with any ``NamedSharding`` (``fuse_sharded_leaves``): both passes of a
leaf run as one jitted program where the leaf's shards live; jit partitions the reductions (the
Gram matrix, the counts: exact int32 sums) and adds their all-reduces, and the fused leaf keeps
the backbone leaf's sharding.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import shard_map
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpift_jax import host
from cpift_jax import sphere
from cpift_jax.row_blocks import BLOCK_MIN_ENTRIES, row_view, submit_row_blocks
from cpift_jax.transplant import core_value

__all__ = ["check_mesh", "row_view", "is_sharded", "place", "count_layout", "fuse_leaves",
           "fuse_sharded_leaves"]


# ------------------------------------------------------------------------------ row layouts


def check_mesh(mesh) -> str:
    """The name of the single axis of ``mesh``; ``ValueError`` for anything else."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must have exactly one axis, got axes {mesh.axis_names}")
    return mesh.axis_names[0]


def is_sharded(shape: tuple[int, ...], mesh: Mesh | None) -> bool:
    """Whether a leaf of ``shape`` is split over ``mesh`` (leading dim a multiple of its size)."""
    return mesh is not None and len(shape) >= 1 and shape[0] % mesh.size == 0


def place(x: jax.Array, mesh: Mesh, sharded: bool) -> jax.Array:
    """``x`` split along its leading axis over ``mesh``, or replicated over it (never on one
    device, which other hosts could not reach); no copy when ``x`` is already laid out that way."""
    target = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]) if sharded else PartitionSpec())
    if getattr(x, "sharding", None) is not None and x.sharding.is_equivalent_to(target, x.ndim):
        return x
    return jax.device_put(x, target)


# ---------------------------------------------------------------------------- the two passes


def count_layout(n: int, rule: str) -> list[str]:
    """Names of the report counts, in the order of a leaf's count vector."""
    winners = [] if rule == "mean" else [f"winner {i}" for i in range(n)]
    return [f"overlap {i},{j}" for i, j in sphere.pairs(n)] + ["union", "in >= 2 cores"] + winners


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


def _stats(b2, xs2, ms2, *, plan: _Plan):
    """Pass 1 over one leaf's (rows, cols) view: (Gram matrix of the task models over the
    non-core entries, or None; int32 counts in ``count_layout`` order)."""
    n = plan.n
    bf, xf = b2.astype(jnp.float32), [x.astype(jnp.float32) for x in xs2]
    union = functools.reduce(operator.or_, ms2)
    pairs = sphere.pairs(n)
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
        _, winner = core_value(bf, xf, ms2, plan.rule)
        ints += [as_int(winner == i) for i in range(1, n)]

    sums = sphere.row_sums(floats + ints)  # one read of the inputs for every product and count
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
        gram = sphere.gram_from_pair_sums(sums, n)  # (rows, n, n)
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
    bf, xf = b2.astype(jnp.float32), [x.astype(jnp.float32) for x in xs2]
    if plan.slerp:
        coeffs = sphere.fold_coefficients(gram, extra, eps=plan.eps, dot_threshold=plan.dot_threshold)
        coeffs = coeffs[:, :, None] if plan.rows else coeffs[None, :, None]  # (rows|1, n, 1)
        merged = sum(coeffs[:, i] * xf[i] for i in range(plan.n))
    else:
        merged = extra.astype(jnp.float32)
    core, _ = core_value(bf, xf, ms2, plan.rule)
    union = functools.reduce(operator.or_, ms2)
    return jnp.where(union, core, merged).astype(b2.dtype)


# --------------------------------------------------------------------- compiled programs


def _view(x, plan: _Plan):
    return x.reshape(row_view(x.shape, plan.parts))  # a free bitcast inside the jit


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

    def run_stats(backbone, xs, ms):
        return stats(_view(backbone, plan), tuple(_view(x, plan) for x in xs),
                     tuple(_view(m, plan) for m in ms))

    def run_apply(backbone, xs, ms, extra, gram):
        out = apply(_view(backbone, plan), tuple(_view(x, plan) for x in xs),
                    tuple(_view(m, plan) for m in ms), extra if plan.slerp else _view(extra, plan), gram)
        return out.reshape(backbone.shape)

    return (
        jax.jit(run_stats, compiler_options=host.reduction_compiler_options(platform)),
        # keep_unused: rules that never read the backbone ("first", "mean") would otherwise
        # drop it from the program, so its donated buffer could not hold the output and pass 2
        # would write a fresh one (page faults: 2x slower on CPU).
        jax.jit(run_apply, donate_argnums=(0,) if donate else (), keep_unused=donate),
    )


@functools.lru_cache(maxsize=None)
def _compiled_block_stats(plan: _Plan, rows: int):
    """Pass 1 over ``rows`` rows of the (rows, cols) view from a traced row ``start`` (the slice
    is fused into the reduction: no copy); unsharded CPU leaves only."""

    def run(start, backbone, xs, ms):
        block = lambda x: jax.lax.dynamic_slice_in_dim(_view(x, plan), start, rows)  # noqa: E731
        return _stats(block(backbone), tuple(map(block, xs)), tuple(map(block, ms)), plan=plan)

    return jax.jit(run, compiler_options=host.reduction_compiler_options("cpu"))


def _platform(x) -> str:
    """The platform a leaf lives on (host arrays count as CPU)."""
    return next(iter(x.devices())).platform if isinstance(x, jax.Array) else "cpu"


def _submit_stats(plan, mesh, donate, args, blocks: int) -> list[concurrent.futures.Future]:
    """Pass 1 of one leaf as futures of (gram, counts), one per row block (in row order)."""
    backbone, xs, ms, _ = args
    platform = _platform(backbone)
    rows = row_view(np.shape(backbone), plan.parts)[0]
    if mesh is not None or platform != "cpu" or blocks < 2 or rows < blocks:
        stats = _compiled(plan, mesh, donate, platform)[0]
        return [host.thread_pool().submit(stats, backbone, xs, ms)]
    return submit_row_blocks(functools.partial(_compiled_block_stats, plan), (backbone, xs, ms),
                             rows, blocks)


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


def fuse_leaves(
    backbone: Sequence, models: Sequence[Sequence], cores: Sequence[Sequence], extras: Sequence, *,
    rule: str, slerp: bool, row_slerp: bool = False, eps: float = sphere.EPS,
    dot_threshold: float = sphere.DOT_THRESHOLD, mesh: Mesh | None = None, donate: bool = False,
    row_blocks: int | None = None, block_min_entries: int = BLOCK_MIN_ENTRIES,
) -> tuple[list, list]:
    """(fused leaves, per-leaf int32 count vectors in ``count_layout`` order).

    Leaf j: ``backbone[j]``, the task models' ``models[j]`` and bool ``cores[j]`` (one per task),
    and ``extras[j]``: the float32 fold steps t_2..t_n with ``slerp``, else the operator's merged
    leaf. Inputs are checked by the caller (``fusion.fuse``). ``row_slerp``: one SLERP per row of
    leaves with two or more axes. CPU leaves of at least ``block_min_entries`` entries run pass 1
    as ``row_blocks`` parallel row blocks (default: the usable CPUs).
    """
    n = len(models[0]) if models else 0
    axis = check_mesh(mesh) if mesh is not None else None
    blocks = host.usable_cpus() if row_blocks is None else row_blocks
    # Pass 1 of every leaf is queued at once; pass 2 of each leaf follows in order as soon as
    # its pass 1 is done.
    jobs = []
    for b, xs, ms, extra in zip(backbone, models, cores, extras):
        shape = np.shape(b)
        split = is_sharded(shape, mesh)
        plan = _Plan(n=n, rule=rule, slerp=slerp, rows=row_slerp and len(shape) >= 2, eps=float(eps),
                     dot_threshold=float(dot_threshold), parts=mesh.size if split else 1,
                     axis=axis if split else None)
        args = [b, tuple(xs), tuple(ms), extra]
        if mesh is not None:
            args = jax.tree.map(lambda x: place(jnp.asarray(x), mesh, split), args[:3]) + [
                extra if slerp else place(extra, mesh, split)]
        leaf_mesh = mesh if split else None
        leaf_blocks = blocks if np.size(b) >= block_min_entries else 1
        jobs.append((plan, leaf_mesh, args, _submit_stats(plan, leaf_mesh, donate, args, leaf_blocks)))
    outs, counts = [], []
    for plan, leaf_mesh, args, futures in jobs:
        out, leaf_counts = _finish_leaf(plan, leaf_mesh, donate, args, futures)
        outs.append(out)
        counts.append(leaf_counts)
    return outs, counts


# ------------------------------------------------------------------- leaves sharded on a mesh


@functools.lru_cache(maxsize=None)
def _sharded_program(plan: _Plan, sharding: NamedSharding, donate: bool):
    """Both passes of one leaf in one jitted program; the fused leaf gets ``sharding`` and the
    counts come back replicated over its mesh (readable by every process)."""

    def run(backbone, xs, ms, extra):
        view = functools.partial(_view, plan=plan)
        b2, xs2, ms2 = view(backbone), tuple(map(view, xs)), tuple(map(view, ms))
        gram, counts = _stats(b2, xs2, ms2, plan=plan)
        out = _apply(b2, xs2, ms2, extra if plan.slerp else view(extra), gram, plan=plan)
        return out.reshape(backbone.shape), counts

    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    return jax.jit(run, out_shardings=(sharding, replicated),
                   donate_argnums=(0,) if donate else (), keep_unused=donate)


def fuse_sharded_leaves(
    backbone: Sequence[jax.Array], models: Sequence[Sequence], cores: Sequence[Sequence],
    extras: Sequence, *, rule: str, slerp: bool, row_slerp: bool = False, eps: float = sphere.EPS,
    dot_threshold: float = sphere.DOT_THRESHOLD, donate: bool = False,
) -> tuple[list, list]:
    """``fuse_leaves`` for leaves already sharded with ``NamedSharding``s on one mesh: each fused
    leaf has its backbone leaf's sharding, nothing is gathered to one device or the host. Same
    arguments and results as ``fuse_leaves`` (values to float32 rounding, counts exactly)."""
    n = len(models[0]) if models else 0
    outs, counts = [], []
    for b, xs, ms, extra in zip(backbone, models, cores, extras):
        plan = _Plan(n=n, rule=rule, slerp=slerp, rows=row_slerp and b.ndim >= 2, eps=float(eps),
                     dot_threshold=float(dot_threshold), parts=1, axis=None)
        if slerp:  # the fold steps, replicated like the counts
            extra = jax.device_put(extra, NamedSharding(b.sharding.mesh, PartitionSpec()))
        out, leaf_counts = _sharded_program(plan, b.sharding, donate)(b, tuple(xs), tuple(ms), extra)
        outs.append(out)
        counts.append(leaf_counts)
    return outs, counts
