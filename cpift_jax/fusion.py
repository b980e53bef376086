"""CPI fusion: transplant each task's core entries, merge the other entries across the tasks.

Step 4 of CPI-FT (arXiv 2508.21741). Given a backbone, task models theta_1..theta_n (probe
fine-tunes of one base) and their core masks C_1..C_n (bool pytrees, ``masks.core_mask``), with
U = C_1 | ... | C_n:

    fused[e] = core value at e                          if e is in U
    fused[e] = merge(theta_1, ..., theta_n)[e]          otherwise

Core value where cores overlap: ``overlap`` (``cpift_jax.transplant``: ``"max_delta"``, the
default, ``"mean"`` or ``"first"``; an entry in one core simply takes that task's value). Every
entry comes from a core or from the merge, so the backbone's own values never appear: it is
read only by ``"max_delta"`` and passed as ``base=`` to operators other than SLERP.

Non-core merge: operator ``merge`` of ``cpift_jax.merges`` with ``**merge_kwargs``, given
``mask=~U`` if its ``merge`` takes a mask (then norms, cosines and other statistics are taken
over the non-core entries only, so the cores' large updates do not tilt them) and ``base=``
the backbone. ``"slerp"`` (default) is the paper's choice.

One definition, two backends:
- ``fuse_leafwise`` is the definition: the operator on whole leaves, then the overlap rule on U,
  composed from jittable parts (it also runs under ``jax.jit``).
- ``fusion_kernel`` is the host backend: two passes per leaf tuned for XLA:CPU, SLERP folded in
  one reduction pass (``sphere.fold_coefficients``), an optional 1-D device mesh, and the
  backbone's buffers reusable for the output (``donate_backbone``).
``fuse`` runs the kernel for host arrays (NumPy, CPU ``jax.Array``s) and with a ``mesh``, else
the definition (``backend`` overrides); both return the same report and equal values: exactly
for operators other than SLERP, to float32 rounding for SLERP (a one-pass fold against the
sequential one).

Models already sharded over a device mesh (every leaf of the backbone, the task models and the
core masks a ``jax.Array`` with a ``NamedSharding`` on one mesh, any partition): the kernel's
maths run leaf by leaf as jitted programs where the shards live
(``fusion_kernel.fuse_sharded_leaves``), the definition as one jitted program; either way every
fused leaf has its backbone leaf's sharding and nothing is gathered to one device or the host.
An operator other than SLERP is traced under ``jit`` there (its merged leaves sharded like the
backbone). Same report exactly, values to float32 rounding (reductions summed in another order).

Report (JSON-serialisable Python ints): ``total_params``; ``core_union`` = |U|;
``merged_entries`` = total - |U|; ``core_sizes`` |C_i|; ``pairwise_overlap`` |C_i & C_j|
(diagonal = core sizes); ``overlap_entries`` (entries in >= 2 cores); ``transplanted`` (entries
whose value came from task i; with ``"mean"`` every task of an overlapping entry counts, so
these are the core sizes); plus ``num_tasks``, ``merge`` and ``overlap_rule``.
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cpift_jax import fusion_kernel
from cpift_jax import masks as masks_lib
from cpift_jax import merges
from cpift_jax import sphere
from cpift_jax import tree as tree_lib
from cpift_jax.transplant import OVERLAP_RULES, check_overlap, core_value

__all__ = ["fuse", "fuse_leafwise", "check_overlap", "OVERLAP_RULES", "BACKENDS"]

Pytree = Any
BACKENDS = ("kernel", "definition")
_FUSE_OWNED = ("models", "mask", "base")  # fuse passes these to the operator itself
_MAX_LEAF = 2**31 - 1  # the kernel counts in int32 per leaf


def _check_inputs(backbone, tuned_models, core_masks, overlap: str) -> list[list]:
    """Validates fuse's inputs; the core masks' leaves, per task, in the backbone's leaf order."""
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
    return [masks_lib.check_mask(backbone, m, names=("backbone", f"core_masks[{i}]"))
            for i, m in enumerate(core_masks)]


def _check_operator(merge: str, merge_kwargs: dict):
    """The operator's ``merge`` function; unknown names list what exists."""
    fn = merges.get(merge)
    owned = sorted(set(merge_kwargs) & set(_FUSE_OWNED))
    if owned:
        raise ValueError(f"fuse sets {owned} for the merge operator itself; do not pass them")
    return fn


def _operator_merge(fn, backbone, tuned_models, masks_by_task: list[list], merge_kwargs: dict) -> list:
    """Leaves of the operator's whole-leaf merge, with ``base=backbone`` and ``mask=~U`` where
    its ``merge`` takes a mask."""
    kwargs = dict(merge_kwargs)
    if "mask" in inspect.signature(fn).parameters:
        kwargs["mask"] = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(backbone),
            [~functools.reduce(operator.or_, ms) for ms in zip(*masks_by_task)])
    return jax.tree_util.tree_leaves(fn(list(tuned_models), base=backbone, **kwargs))


def fuse_leafwise(backbone, tuned_models, core_masks, *, merge: str = "slerp",
                  overlap: str = "max_delta", **merge_kwargs):
    """Fused parameters by the definition: the operator ``merge`` on whole leaves (``mask=~U``
    where it takes one, ``base=backbone``), then the core value on U. Jittable; no report."""
    masks_by_task = _check_inputs(backbone, tuned_models, core_masks, overlap)
    fn = _check_operator(merge, merge_kwargs)
    return _fused(backbone, tuned_models, masks_by_task, fn, overlap, merge_kwargs)


def _fused(backbone, tuned_models, masks_by_task: list[list], fn, overlap: str, merge_kwargs: dict):
    """``fuse_leafwise`` on inputs already checked."""
    merged = _operator_merge(fn, backbone, tuned_models, masks_by_task, merge_kwargs)
    _, b_leaves, treedef = tree_lib.flatten(backbone)
    per_task = [jax.tree_util.tree_leaves(t) for t in tuned_models]
    out = []
    for j, b in enumerate(b_leaves):
        ms = [task[j] for task in masks_by_task]
        xs = [jnp.asarray(task[j], jnp.float32) for task in per_task]
        core, _ = core_value(jnp.asarray(b, jnp.float32), xs, ms, overlap)
        union = functools.reduce(operator.or_, ms)
        out.append(jnp.where(union, core, jnp.asarray(merged[j], jnp.float32)).astype(jnp.result_type(b)))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames="rule")
def _leaf_counts(backbone, models, cores, rule: str):
    """One leaf's report counts in ``fusion_kernel.count_layout`` order, straight from the masks."""
    n = len(models)
    count = lambda m: jnp.sum(m, dtype=jnp.int32)  # noqa: E731
    in_cores = sum(m.astype(jnp.int32) for m in cores)
    counts = [count(cores[i] & cores[j]) for i, j in sphere.pairs(n)]
    counts += [count(in_cores >= 1), count(in_cores >= 2)]
    if rule != "mean":
        _, winner = core_value(backbone.astype(jnp.float32), [x.astype(jnp.float32) for x in models],
                               cores, rule)
        counts += [count(winner == i) for i in range(n)]
    return jnp.stack(counts)


def _slerp_settings(fn, merge_kwargs: dict, n: int, paths: list[str]):
    """(row granularity?, eps, dot_threshold, per-leaf float32 fold steps) from SLERP's options."""
    params = inspect.signature(fn).parameters
    options = [k for k in params if k not in _FUSE_OWNED]
    unknown = sorted(set(merge_kwargs) - set(options))
    if unknown:
        raise TypeError(f"unknown slerp option(s) {unknown}; slerp takes {', '.join(options)}")
    opts = {k: merge_kwargs.get(k, params[k].default) for k in options}
    if opts["granularity"] not in sphere.GRANULARITIES:
        raise ValueError(f"granularity must be one of {sphere.GRANULARITIES}, got {opts['granularity']!r}")
    schedule = sphere.fold_schedule(n, paths, t=opts["t"], weights=opts["weights"])
    # NumPy, not jnp: eager jnp ops cost ~1 ms of dispatch per leaf, more than a small leaf's kernel.
    steps = [np.asarray([np.float32(t) for t in ts], np.float32) for ts in schedule]
    return opts["granularity"] == "row", float(opts["eps"]), float(opts["dot_threshold"]), steps


def _report(counts: list, n: int, total: int, merge: str, overlap: str) -> dict:
    layout = fusion_kernel.count_layout(n, overlap)
    summed = np.sum([np.asarray(c, np.int64) for c in counts], axis=0) if counts else np.zeros(len(layout), np.int64)
    pairs = sphere.pairs(n)
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


def _on_host(leaves) -> bool:
    return all(not isinstance(x, jax.Array) or all(d.platform == "cpu" for d in x.devices()) for x in leaves)


def _input_mesh(paths, b_leaves, x_leaves, m_leaves):
    """The mesh the inputs are sharded over (``masks.leaves_mesh``), or None."""
    named = [(p, "backbone", b) for p, b in zip(paths, b_leaves)]
    for p, xs, ms in zip(paths, x_leaves, m_leaves):
        named += [(p, f"tuned_models[{i}]", x) for i, x in enumerate(xs)]
        named += [(p, f"core_masks[{i}]", m) for i, m in enumerate(ms)]
    return masks_lib.leaves_mesh(named, "fuse")


def _sharded_jit(fn, b_leaves):
    """``fn`` jitted with its outputs (a list, one per backbone leaf) sharded like the backbone."""
    return jax.jit(fn, out_shardings=[b.sharding for b in b_leaves])


def fuse(
    backbone: Pytree,
    tuned_models: Sequence[Pytree],
    core_masks: Sequence[Pytree],
    *,
    merge: str = "slerp",
    overlap: str = "max_delta",
    mesh: Mesh | None = None,
    donate_backbone: bool = False,
    backend: str | None = None,
    **merge_kwargs,
) -> tuple[Pytree, dict]:
    """Fused parameters (backbone's structure and dtypes) and a report; see the module docstring.

    ``merge_kwargs`` go to the merge operator (``base`` and ``mask`` are set by fuse).
    Inputs sharded over a mesh keep their shardings (module docstring). ``mesh``: a 1-D device
    mesh the kernel lays the leaves out on, whatever their placement: split along the leading
    axis, or replicated where that does not divide.
    ``donate_backbone=True``: the kernel writes the output into the backbone's buffers (the
    backbone arrays are deleted).
    ``backend``: ``"kernel"`` or ``"definition"``; None picks the kernel for host arrays, a
    mesh or sharded inputs, and the definition otherwise.
    """
    masks_by_task = _check_inputs(backbone, tuned_models, core_masks, overlap)
    fn = _check_operator(merge, merge_kwargs)
    n = len(tuned_models)
    paths, b_leaves, treedef = tree_lib.flatten(backbone)
    x_leaves = [list(xs) for xs in zip(*(jax.tree_util.tree_leaves(t) for t in tuned_models))]
    m_leaves = [list(ms) for ms in zip(*masks_by_task)]
    # With a 1-D mesh the kernel lays the leaves out itself (fusion_kernel.place).
    on_mesh = mesh is None and _input_mesh(paths, b_leaves, x_leaves, m_leaves) is not None
    if backend is None:
        backend = "kernel" if on_mesh or mesh is not None or _on_host(b_leaves) else "definition"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "definition" and mesh is not None:
        raise ValueError("a mesh needs backend='kernel' (the definition runs where its inputs live)")
    total = sum(int(np.size(b)) for b in b_leaves)  # before any donation
    if merge == "slerp":
        row_slerp, eps, threshold, extras = _slerp_settings(fn, merge_kwargs, n, paths)

    if backend == "definition":
        counts = [_leaf_counts(b, tuple(xs), tuple(ms), overlap) for b, xs, ms in zip(b_leaves, x_leaves, m_leaves)]
        if on_mesh:
            fused = treedef.unflatten(_sharded_jit(
                lambda b, ts, ms: jax.tree_util.tree_leaves(_fused(b, ts, ms, fn, overlap, merge_kwargs)),
                b_leaves)(backbone, list(tuned_models), masks_by_task))
        else:
            fused = _fused(backbone, tuned_models, masks_by_task, fn, overlap, merge_kwargs)
        return fused, _report(counts, n, total, merge, overlap)

    if merge != "slerp":
        row_slerp, eps, threshold = False, 0.0, 0.0
        if on_mesh:
            extras = _sharded_jit(lambda b, ts, ms: _operator_merge(fn, b, ts, ms, merge_kwargs),
                                  b_leaves)(backbone, list(tuned_models), masks_by_task)
        else:
            extras = _operator_merge(fn, backbone, tuned_models, masks_by_task, merge_kwargs)
    options = dict(rule=overlap, slerp=merge == "slerp", row_slerp=row_slerp, eps=eps,
                   dot_threshold=threshold, donate=donate_backbone)
    if on_mesh:
        outs, counts = fusion_kernel.fuse_sharded_leaves(b_leaves, x_leaves, m_leaves, extras, **options)
    else:
        outs, counts = fusion_kernel.fuse_leaves(b_leaves, x_leaves, m_leaves, extras, mesh=mesh, **options)
    return jax.tree_util.tree_unflatten(treedef, outs), _report(counts, n, total, merge, overlap)
