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

More than two models (``mode="fold"``, the only mode; ``multislerp`` and ``karcher`` are the
one-step spherical means): a sequential fold
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
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cpift_jax import hparams
from cpift_jax import tree as tree_lib
from cpift_jax.merges._common import check_models, f32, row_sums

__all__ = ["slerp", "slerp_coefficients", "fold_ts", "fold_schedule", "fold_coefficients", "merge"]

PER_LEAF_HPARAMS = ("t",)
INTERPOLATION_ENDPOINTS = (({"t": 0.0}, 0), ({"t": 1.0}, 1))

MODES = ("fold",)
GRANULARITIES = ("leaf", "row")
EPS = 1e-8
DOT_THRESHOLD = 0.9995


def slerp_coefficients(aa, bb, ab, t, *, eps=EPS, dot_threshold=DOT_THRESHOLD):
    """(c_a, c_b) with slerp(a, b; t) = c_a a + c_b b, from aa = <a,a>, bb = <b,b>, ab = <a,b>.

    Works elementwise on arrays of sums (one per row for row granularity). No NaN in either
    branch: the arccos input is clipped and sin(theta) is replaced by 1 where it is unused.
    """
    # Squared norms from a Gram matrix can round below zero.
    na = jnp.sqrt(jnp.maximum(jnp.asarray(aa, jnp.float32), 0.0))
    nb = jnp.sqrt(jnp.maximum(jnp.asarray(bb, jnp.float32), 0.0))
    ab = jnp.asarray(ab, jnp.float32)
    t = jnp.asarray(t, jnp.float32)
    # Divide only by norms above eps (mergekit's normalize); tiny vectors stay as they are.
    scale_a = 1.0 / jnp.where(na > eps, na, 1.0)
    scale_b = 1.0 / jnp.where(nb > eps, nb, 1.0)
    cos = ab * scale_a * scale_b
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin_theta = jnp.sin(theta)
    linear = (jnp.abs(cos) > dot_threshold) | (sin_theta <= 0.0)
    safe_sin = jnp.where(linear, 1.0, sin_theta)
    theta_t = theta * t
    c_a = jnp.where(linear, 1.0 - t, jnp.sin(theta - theta_t) / safe_sin)
    c_b = jnp.where(linear, t, jnp.sin(theta_t) / safe_sin)
    return c_a, c_b


def _uses_rows(x: jax.Array, granularity: str) -> bool:
    return granularity == "row" and x.ndim >= 2


# Jitted so that eager calls fuse the products into the reduction too (no three leaf-sized
# temporaries); under an outer jit this is inlined.
@functools.partial(jax.jit, static_argnames="rows")
def _inner_products(x: jax.Array, y: jax.Array, rows: bool) -> tuple[jax.Array, ...]:
    """(<x, x>, <y, y>, <x, y>) per row (keepdims, for broadcasting) or over the whole leaf
    (row sums first: shorter float32 accumulations than one flat sum), from one read of x, y."""
    if x.ndim == 0:
        return x * x, y * y, x * y
    per_row = row_sums([x * x, y * y, x * y])
    return tuple(s[..., None] if rows else jnp.sum(s) for s in per_row)


def _check_t_value(t, where: str) -> None:
    if isinstance(t, numbers.Real) and not isinstance(t, bool) and not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"{where} must be in [0, 1], got {t}")


def slerp(a, b, t, mask=None, *, eps=EPS, dot_threshold=DOT_THRESHOLD, granularity="leaf"):
    """SLERP of two same-shape arrays (see the module docstring); result in ``a``'s dtype.

    ``t``: Python float in [0, 1] or a 0-d array. ``mask``: optional bool array of the same
    shape; entries where it is False are returned as in ``a``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    _check_t_value(t, "t")
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(f"slerp needs same-shape arrays, got {jnp.shape(a)} and {jnp.shape(b)}")
    if mask is not None and (jnp.shape(mask) != jnp.shape(a) or jnp.result_type(mask) != jnp.bool_):
        raise ValueError(
            f"mask must be a bool array of shape {tuple(jnp.shape(a))}, got "
            f"{jnp.result_type(mask)} of shape {tuple(jnp.shape(mask))}"
        )
    dtype = jnp.result_type(a)
    a32, b32 = f32(a), f32(b)
    am, bm = (a32, b32) if mask is None else (jnp.where(mask, a32, 0.0), jnp.where(mask, b32, 0.0))
    rows = _uses_rows(a32, granularity)
    c_a, c_b = slerp_coefficients(
        *_inner_products(am, bm, rows), t,
        eps=eps, dot_threshold=dot_threshold,
    )
    out = c_a * a32 + c_b * b32
    if mask is not None:
        out = jnp.where(mask, out, a32)
    return out.astype(dtype)


def fold_ts(n: int, weights: Sequence[float] | None = None) -> list[float]:
    """Fold steps t_2..t_n: t_i = w_i / (w_1 + ... + w_i) (0 while that sum is 0); equal: 1/i."""
    if weights is None:
        return [1.0 / i for i in range(2, n + 1)]
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ValueError(f"weights must be a list of {n} numbers, got {weights!r}")
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries for {n} models")
    if any(not x >= 0 for x in w) or not sum(w) > 0:
        raise ValueError(f"slerp weights must be >= 0 with a positive sum, got {w}")
    ts, total = [], w[0]
    for wi in w[1:]:
        total += wi
        ts.append(wi / total if total > 0 else 0.0)
    return ts


def fold_coefficients(gram, ts, *, eps=EPS, dot_threshold=DOT_THRESHOLD):
    """Coefficients c (..., n) with fold(m_1..m_n) = sum_i c_i m_i, from the Gram matrix.

    ``gram[..., i, j] = <m_i, m_j>`` (over the entries being merged); ``ts`` holds t_2..t_n.
    Every fold step is a linear combination of the models, so <acc, acc> = c^T G c and
    <acc, m_i> = (G c)_i: one reduction pass over the data gives the whole fold, which is what
    ``fusion.fuse`` runs. Equals the sequential fold up to float32 rounding (apart from
    cancellation to ~zero norm, where rounding decides whether eps is crossed).
    """
    gram = jnp.asarray(gram, jnp.float32)
    n = gram.shape[-1]
    eye = jnp.eye(n, dtype=jnp.float32)
    c = jnp.broadcast_to(eye[0], gram.shape[:-1])
    for i in range(1, n):
        g_c = jnp.einsum("...ij,...j->...i", gram, c, precision=jax.lax.Precision.HIGHEST)
        aa = jnp.sum(c * g_c, axis=-1)
        c_a, c_b = slerp_coefficients(
            aa, gram[..., i, i], g_c[..., i], ts[i - 1], eps=eps, dot_threshold=dot_threshold
        )
        c = c_a[..., None] * c + c_b[..., None] * eye[i]
    return c


def fold_schedule(n: int, paths: Sequence[str], *, t=0.5, weights=None) -> list[list]:
    """Per leaf, the fold steps [t_2, ..., t_n] (see the module docstring), validated.

    Two models without weights: [t] with t per leaf (a scalar or a pytree of scalars in [0, 1]).
    Otherwise the weights' schedule ``fold_ts``, the same for every leaf.
    """
    t_leaves = hparams.values_for_paths(t, paths, name="t")
    for path, value in zip(paths, t_leaves):
        _check_t_value(value, f"t for leaf '{path}'")
    if n == 1:
        return [[] for _ in paths]
    if n == 2 and weights is None:
        return [[value] for value in t_leaves]
    if isinstance(t, numbers.Real) and float(t) != 0.5:
        raise ValueError(
            f"t={t} applies only to two models without weights; got {n} models"
            + (" and weights" if weights is not None else "")
            + " (the fold takes t_i from the weights; leave t at its default)"
        )
    ts = fold_ts(n, weights)
    return [list(ts) for _ in paths]


def _check_mask_tree(mask, reference) -> list:
    tree_lib.check_same_shapes(reference, mask, names=("models[0]", "mask"))
    paths, leaves, _ = tree_lib.flatten(mask)
    for path, leaf in zip(paths, leaves):
        if jnp.result_type(leaf) != jnp.bool_:
            raise ValueError(f"mask leaf '{path}' must be bool, got {jnp.result_type(leaf)}")
    return leaves


def merge(
    models: Sequence,
    *,
    base=None,
    weights: Sequence[float] | None = None,
    t=0.5,
    mask=None,
    mode: str = "fold",
    granularity: str = "leaf",
    eps: float = EPS,
    dot_threshold: float = DOT_THRESHOLD,
):
    del base  # documented: SLERP interpolates the models themselves
    check_models(models)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} (see also multislerp, karcher), got {mode!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    n = len(models)
    paths, first, treedef = tree_lib.flatten(models[0])
    schedule = fold_schedule(n, paths, t=t, weights=weights)
    masks = _check_mask_tree(mask, models[0]) if mask is not None else [None] * len(paths)

    per_model = [jax.tree_util.tree_leaves(m) for m in models]
    out = []
    for j in range(len(paths)):
        acc = f32(per_model[0][j])  # the fold stays in float32; one cast at the end
        for i in range(1, n):
            acc = slerp(acc, per_model[i][j], schedule[j][i - 1], masks[j], eps=eps,
                        dot_threshold=dot_threshold, granularity=granularity)
        out.append(jnp.asarray(acc).astype(jnp.result_type(first[j])))
    return jax.tree_util.tree_unflatten(treedef, out)
