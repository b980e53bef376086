"""SLERP: spherical linear interpolation of two models, folded over more.

Shoemake, 1985, "Animating rotation with quaternion curves" (SIGGRAPH); as a weight merge,
mergekit's ``slerp``. Per leaf (or per row, see ``granularity``), in float32:

1. Norms ||a||, ||b|| over the leaf (Frobenius). A vector whose norm is ``<= eps`` is *not*
   normalised (mergekit divides only when the norm exceeds eps), so its cosine with anything
   is ~0 and the pair is treated as orthogonal.
2. cos = <a, b> / (||a|| ||b||) on the normalised copies.
3. If |cos| > ``dot_threshold`` (parallel or antiparallel) or sin(theta) == 0, linear
   interpolation: (1 - t) a + t b. Otherwise, with theta = arccos(cos),
       slerp(a, b; t) = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b.
   The coefficients come from the angle between the *normalised* copies, but they mix the
   *original* a and b (mergekit semantics: norms are interpolated, not fixed to 1).
4. Cast back to the input dtype.

``mask`` (bool, per leaf): norms, cosine and interpolation use only the entries where the mask is
True; the other entries are returned as in ``a`` (``models[0]``). The result on the masked
entries equals SLERP of the selected entries alone. ``fusion.fuse`` uses this to merge the
non-core entries only.

More than two models (``multislerp`` and ``karcher`` are the one-step spherical means): a
sequential fold
    acc_1 = m_1,   acc_i = slerp(acc_{i-1}, m_i; t_i),   t_i = w_i / (w_1 + ... + w_i),
so with equal weights t_i = 1/i and every model gets the same share of the interpolation
(exactly so for linear interpolation). The result depends on the order of the models.
If w_1 + ... + w_i == 0 then t_i = 0. With ``weights`` given, every step (also for two models)
uses t_i from the weights; ``t`` is used only for two models without weights, and a scalar
``t`` other than 0.5 with more models or with weights raises ``ValueError``.

``granularity="row"``: one cosine and one pair of coefficients per row, a row being the last
axis (a (out, in) kernel has ``out`` rows of length ``in``); leaves with fewer than two axes
fall back to the whole leaf. ``base`` is ignored (SLERP interpolates the models themselves, as
mergekit does; ``fusion.fuse`` passes its backbone to every operator).

Degenerate cases: one model gives it back; identical or colinear models interpolate linearly;
zero (or ``<= eps``) vectors are not normalised, so they count as orthogonal to everything
(two zero vectors give zero); antipodal models interpolate linearly through zero; t = 0 and
t = 1 return the endpoints exactly (sin(theta)/sin(theta) = 1 in floating point).

Per leaf the work is two passes: one reduction for the Gram matrix <m_i, m_j> (the whole fold's
coefficients follow from it, ``sphere.fold_coefficients``) and one elementwise pass for
``sum_i c_i m_i``, compiled as one program (``merge_leaf``) that inlines under an outer ``jit``.
Eager calls on big host leaves (at least ``row_blocks.BLOCK_MIN_ENTRIES`` entries, more than one
CPU) run the reduction as parallel row blocks (``row_blocks``; XLA:CPU runs one reduction on one
thread) and the elementwise pass as a second program; results equal the one-program definition
to float32 rounding (the same per-row partial sums). ``donate=True`` lets the elementwise pass
write into ``models[0]``'s buffers: a fresh output costs page faults about as long as both
passes on CPU.

The coefficient maths (``slerp_coefficients``, the fold schedule and its one-pass coefficients)
lives in ``cpift_jax.sphere``, shared with ``fusion``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpift_jax import host
from cpift_jax import sphere
from cpift_jax import masks as masks_lib
from cpift_jax import tree as tree_lib
from cpift_jax.merges._common import check_models, donatable, f32, is_traced, leaf_program
from cpift_jax.row_blocks import BLOCK_MIN_ENTRIES, row_view, submit_row_blocks
from cpift_jax.sphere import (
    DOT_THRESHOLD, EPS, GRANULARITIES, check_t, fold_coefficients, fold_schedule, row_sums,
)

__all__ = ["slerp", "merge"]

REQUIRES_BASE = False
MIN_MODELS = 1
MAX_MODELS = None
PER_LEAF_HPARAMS = ("t",)
INTERPOLATION_ENDPOINTS = (({"t": 0.0}, 0), ({"t": 1.0}, 1))


def _gram(zs: list[jax.Array], rows: bool) -> jax.Array:
    """Gram matrix ``(..., n, n)`` of the float32 leaves ``zs``: per row (the last axis) or over
    the whole leaf (sums over the rows of its ``row_blocks.row_view`` first: shorter float32
    accumulations than one flat sum, and the same partial sums as the row blocks of the host
    path), every product from one read of the inputs (``sphere.row_sums``)."""
    n = len(zs)
    pairs = sphere.pairs(n)
    if zs[0].ndim == 0:
        sums = [zs[i] * zs[j] for i, j in pairs]
    else:
        if not rows:
            zs = [z.reshape(row_view(z.shape)) for z in zs]
        sums = row_sums([zs[i] * zs[j] for i, j in pairs])
        if not rows:
            sums = [jnp.sum(s) for s in sums]
    return sphere.gram_from_pair_sums(sums, n)


def _float32(first, rest, mask) -> tuple[list[jax.Array], list[jax.Array]]:
    """(the models in float32, the same with the unmasked entries zeroed for the sums)."""
    xs = [f32(x) for x in (first, *rest)]
    return xs, (xs if mask is None else [jnp.where(mask, x, 0.0) for x in xs])


def _interpolate(first, xs, mask, gram, ts, eps, dot_threshold, rows):
    """The fold ``sum_i c_i x_i`` with the coefficients from ``gram`` (for two models exactly
    ``slerp_coefficients``); unmasked entries as in ``first``; in ``first``'s dtype."""
    c = fold_coefficients(gram, ts, eps=eps, dot_threshold=dot_threshold)
    # Per-row coefficients (..., n) broadcast against the rows as (..., 1).
    terms = [(c[..., i, None] if rows else c[i]) * x for i, x in enumerate(xs)]
    out = functools.reduce(operator.add, terms)
    if mask is not None:
        out = jnp.where(mask, out, xs[0])
    return out.astype(first.dtype)


@leaf_program(static_argnames=("rows",), reduction=True)
def merge_leaf(first, rest, ts, mask, eps, dot_threshold, *, rows=False):
    """One leaf: the whole SLERP fold of ``(first, *rest)`` as ``sum_i c_i theta_i`` with the
    coefficients from the Gram matrix (``sphere.fold_coefficients``; for two models exactly
    ``slerp_coefficients``): one reduction pass, one elementwise pass, one output."""
    xs, zs = _float32(first, rest, mask)
    return _interpolate(first, xs, mask, _gram(zs, rows), ts, eps, dot_threshold, rows)


# ------------------------------------------------- big host leaves: pass 1 in parallel row blocks


@functools.lru_cache(maxsize=None)
def _block_gram(count: int, rows: bool):
    """Pass 1 over ``count`` rows of the leaf's row view from a traced ``start``: the Gram
    matrix of those rows (``rows``: one per row). Compiled for reductions."""

    def run(start, first, rest, mask):
        view = row_view(first.shape)
        block = lambda x: jax.lax.dynamic_slice_in_dim(x.reshape(view), start, count)  # noqa: E731
        _, zs = _float32(block(first), [block(x) for x in rest],
                         None if mask is None else block(mask))
        return _gram(zs, rows)

    return jax.jit(run, compiler_options=host.reduction_compiler_options("cpu") or None)


@leaf_program(static_argnames=("rows",))
def _interpolate_leaf(first, rest, ts, mask, eps, dot_threshold, grams, *, rows=False):
    """Pass 2 of a leaf whose Gram matrix came in row blocks (``grams``, in row order)."""
    if rows:
        gram = jnp.concatenate(grams).reshape(first.shape[:-1] + grams[0].shape[-2:])
    else:
        gram = functools.reduce(operator.add, grams)
    xs, _ = _float32(first, rest, mask)
    return _interpolate(first, xs, mask, gram, ts, eps, dot_threshold, rows)


def _in_row_blocks(leaves, blocks: int) -> bool:
    """Whether a leaf's pass 1 runs as parallel row blocks: eager host arrays of at least
    ``BLOCK_MIN_ENTRIES`` entries, with more than one usable CPU."""
    first = leaves[0]
    return (blocks > 1 and not is_traced(leaves) and np.size(first) >= BLOCK_MIN_ENTRIES
            and all(isinstance(x, jax.Array) and next(iter(x.devices())).platform == "cpu"
                    for x in leaves)
            and row_view(np.shape(first))[0] >= blocks)


def _merge_leaves(jobs, eps, dot_threshold, owns) -> list:
    """Merged leaves of ``jobs`` = [(first, rest, ts, mask, rows)], in order.

    Eager big host leaves (``_in_row_blocks``) run pass 1 as row blocks on the host's threads,
    all queued at once; each leaf's pass 2 (one program) is dispatched as soon as its blocks
    are done and runs on XLA's executor while the threads reduce later leaves. Other leaves
    run ``merge_leaf``, which under an outer ``jit`` inlines."""
    hparams = _hparams(eps, dot_threshold)
    blocks = host.usable_cpus()
    pass1 = []
    for first, rest, _, mask, rows in jobs:
        if _in_row_blocks([first, *rest] + ([] if mask is None else [mask]), blocks):
            pass1.append(submit_row_blocks(functools.partial(_block_gram, rows=rows),
                                           (first, tuple(rest), mask),
                                           row_view(np.shape(first))[0], blocks))
        else:
            pass1.append(None)
    out = []
    for (first, rest, ts, mask, rows), futures in zip(jobs, pass1):
        if futures is None:
            out.append(merge_leaf(first, tuple(rest), ts, mask, *hparams, rows=rows,
                                  donate=owns(first)))
        else:
            grams = [f.result() for f in futures]
            out.append(_interpolate_leaf(first, tuple(rest), ts, mask, *hparams, grams,
                                         rows=rows, donate=owns(first)))
    return out


def _hparams(eps, dot_threshold) -> tuple[np.ndarray, np.ndarray]:
    return np.float32(eps), np.float32(dot_threshold)


def slerp(a, b, t, mask=None, *, eps=EPS, dot_threshold=DOT_THRESHOLD, granularity="leaf"):
    """SLERP of two same-shape arrays (see the module docstring); result in ``a``'s dtype.

    ``t``: Python float in [0, 1] or a 0-d array. ``mask``: optional bool array of the same
    shape; entries where it is False are returned as in ``a``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    check_t(t, "t")
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(f"slerp needs same-shape arrays, got {jnp.shape(a)} and {jnp.shape(b)}")
    if mask is not None and (jnp.shape(mask) != jnp.shape(a) or jnp.result_type(mask) != jnp.bool_):
        raise ValueError(
            f"mask must be a bool array of shape {tuple(jnp.shape(a))}, got "
            f"{jnp.result_type(mask)} of shape {tuple(jnp.shape(mask))}"
        )
    ts = jnp.reshape(jnp.asarray(t, jnp.float32), (1,)) if is_traced(t) else np.float32([t])
    a, b = jnp.asarray(a), jnp.asarray(b)
    job = (a, (b,), ts, mask, granularity == "row" and a.ndim >= 2)
    return _merge_leaves([job], eps, dot_threshold, owns=lambda leaf: False)[0]


def merge(
    models: Sequence,
    *,
    base=None,
    weights: Sequence[float] | None = None,
    t=0.5,
    mask=None,
    granularity: str = "leaf",
    eps: float = EPS,
    dot_threshold: float = DOT_THRESHOLD,
    donate: bool = False,
):
    """``donate=True``: the caller gives up ``models[0]`` (its buffers may hold the result)."""
    owns = donatable((models, base), donate)  # an array also passed as base is not given up
    del base  # documented: SLERP interpolates the models themselves
    check_models(models)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    n = len(models)
    paths, first, treedef = tree_lib.flatten(models[0])
    schedule = fold_schedule(n, paths, t=t, weights=weights)
    masks = ([None] * len(paths) if mask is None
             else masks_lib.check_mask(models[0], mask, names=("models[0]", "mask")))
    if n == 1:
        return jax.tree.map(jnp.asarray, models[0])
    per_model = [jax.tree_util.tree_leaves(m) for m in models]
    jobs = []
    for j, leaf in enumerate(first):
        ts = schedule[j]
        if is_traced(ts):
            ts = jnp.stack([jnp.asarray(x, jnp.float32) for x in ts])
        else:
            ts = np.float32(ts)
        jobs.append((leaf, tuple(m[j] for m in per_model[1:]), ts, masks[j],
                     granularity == "row" and jnp.ndim(leaf) >= 2))
    return jax.tree_util.tree_unflatten(treedef, _merge_leaves(jobs, eps, dot_threshold, owns))
