"""Maths on the sphere for the spherical merges: SLERP coefficients, the SLERP fold, spherical means.

Shared by the operators ``merges.slerp``, ``merges.multislerp`` and ``merges.karcher`` and by
``fusion`` (whose kernel runs the whole SLERP fold from one reduction pass), so none of them
imports another. Everything is float32 and jittable.

SLERP (Shoemake, 1985, "Animating rotation with quaternion curves", SIGGRAPH) of vectors a, b
at t in [0, 1], with theta the angle between a / ||a|| and b / ||b||:

    slerp(a, b; t) = sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b,

or (1 - t) a + t b when |cos theta| > ``DOT_THRESHOLD`` or sin(theta) = 0. A vector with norm
``<= EPS`` is not normalised (so it counts as orthogonal to everything). The coefficients mix
the *original* vectors (norms are interpolated, as in mergekit's ``slerp``).

Fold of n models with weights w: acc_1 = m_1, acc_i = slerp(acc_{i-1}, m_i; t_i) with
t_i = w_i / (w_1 + ... + w_i) (equal weights: t_i = 1/i). Every step is a linear combination of
the models, so the fold is sum_i c_i m_i with c from the Gram matrix <m_i, m_j> alone
(``fold_coefficients``).

Spherical means (multislerp, karcher): each vector is split into direction and norm; the
directions are averaged on the sphere and the result is rescaled by the weighted mean norm.
``chordal_direction`` is normalise(sum_i w_i u_i) (one step); ``karcher_direction`` refines it
to the weighted Riemannian (Karcher / Frechet) mean, the minimiser of sum_i w_i d(m, u_i)^2,
by Riemannian gradient steps m <- exp_m(sum_i w_i log_m(u_i)) (Karcher, 1977; Buss & Fillmore,
2001). If the weighted unit vectors cancel, the mean falls back to the weighted linear average.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cpift_jax import hparams

__all__ = [
    "EPS", "DOT_THRESHOLD", "GRANULARITIES", "row_sums", "pairs", "gram_from_pair_sums", "check_t", "slerp_coefficients", "split",
    "fold_ts", "fold_schedule", "fold_coefficients", "log_map", "exp_map", "chordal_direction",
    "karcher_direction", "sphere_mean", "merge_leaves", "normalized_weights",
]

# Norms at or below this have no direction (mergekit's SLERP leaves them unnormalised too).
EPS = 1e-8
DOT_THRESHOLD = 0.9995
# "row": one angle (or mean) per row, a row being the last axis; "leaf": one per leaf.
GRANULARITIES = ("leaf", "row")
# Below this a tangent vector is zero; theta/sin(theta) and sin(a)/a are then 1.
_TINY = 1e-12


def row_sums(terms: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """Sums over the last axis of every term (same shapes, at least 1-D) in ONE variadic
    reduction: XLA reads the inputs of all terms once, where separate ``jnp.sum`` calls each
    re-read them or materialise the products."""
    inits = tuple(jnp.zeros((), t.dtype) for t in terms)
    last = jnp.ndim(terms[0]) - 1
    return jax.lax.reduce(tuple(terms), inits, lambda a, b: tuple(x + y for x, y in zip(a, b)), (last,))


def pairs(n: int) -> list[tuple[int, int]]:
    """The index pairs ``(i, j)``, ``i <= j``, of an ``n x n`` Gram matrix's upper triangle."""
    return [(i, j) for i in range(n) for j in range(i, n)]


def gram_from_pair_sums(sums: Sequence[jax.Array], n: int) -> jax.Array:
    """The symmetric Gram matrix ``(..., n, n)`` from its upper-triangle entries in ``pairs(n)``
    order (each of shape ``(...)``)."""
    index = {pair: k for k, pair in enumerate(pairs(n))}
    return jnp.stack(
        [jnp.stack([sums[index[min(i, j), max(i, j)]] for j in range(n)], -1) for i in range(n)], -2)


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------ SLERP


def check_t(t, where: str) -> None:
    """ValueError unless a Python number ``t`` lies in [0, 1] (arrays are taken as they are)."""
    if isinstance(t, numbers.Real) and not isinstance(t, bool) and not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"{where} must be in [0, 1], got {t}")


def slerp_coefficients(aa, bb, ab, t, *, eps=EPS, dot_threshold=DOT_THRESHOLD):
    """(c_a, c_b) with slerp(a, b; t) = c_a a + c_b b, from aa = <a,a>, bb = <b,b>, ab = <a,b>.

    Works elementwise on arrays of sums (one per row for row granularity). No NaN in either
    branch: the arccos input is clipped and sin(theta) is replaced by 1 where it is unused.
    """
    # Squared norms from a Gram matrix can round below zero.
    na = jnp.sqrt(jnp.maximum(_f32(aa), 0.0))
    nb = jnp.sqrt(jnp.maximum(_f32(bb), 0.0))
    ab = _f32(ab)
    t = _f32(t)
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


def fold_schedule(n: int, paths: Sequence[str], *, t=0.5, weights=None) -> list[list]:
    """Per leaf, the fold steps [t_2, ..., t_n], validated.

    Two models without weights: [t] with t per leaf (a scalar or a pytree of scalars in [0, 1]).
    Otherwise the weights' schedule ``fold_ts``, the same for every leaf; a scalar ``t`` other
    than 0.5 then raises (the fold takes its steps from the weights).
    """
    t_leaves = hparams.values_for_paths(t, paths, name="t")
    for path, value in zip(paths, t_leaves):
        check_t(value, f"t for leaf '{path}'")
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


def fold_coefficients(gram, ts, *, eps=EPS, dot_threshold=DOT_THRESHOLD):
    """Coefficients c (..., n) with fold(m_1..m_n) = sum_i c_i m_i, from the Gram matrix.

    ``gram[..., i, j] = <m_i, m_j>`` (over the entries being merged); ``ts`` holds t_2..t_n.
    With acc = sum_j c_j m_j, <acc, acc> = c^T G c and <acc, m_i> = (G c)_i, so one reduction
    pass over the data gives the whole fold. Equals the sequential fold up to float32 rounding
    (apart from cancellation to ~zero norm, where rounding decides whether eps is crossed).
    """
    gram = _f32(gram)
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


# ------------------------------------------------------------------------- spherical means


def split(flat: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows of ``flat`` (n, d) -> (unit rows, norms, has_direction); zero rows give zero units."""
    norms = jnp.linalg.norm(flat, axis=1)
    has = norms > EPS
    units = flat / jnp.where(has, norms, 1.0)[:, None]
    return jnp.where(has[:, None], units, 0.0), norms, has


def log_map(m: jax.Array, units: jax.Array) -> jax.Array:
    """Tangent vectors at unit ``m`` pointing to each unit row, of length the geodesic angle."""
    cos = _dot(units, m)
    ortho = units - cos[:, None] * m[None]
    sin = jnp.linalg.norm(ortho, axis=1)
    # atan2 keeps small angles accurate where arccos(cos) loses half the float32 digits.
    angle = jnp.arctan2(sin, cos)
    factor = jnp.where(sin > _TINY, angle / jnp.where(sin > _TINY, sin, 1.0), 1.0)
    return factor[:, None] * ortho


def exp_map(m: jax.Array, tangent: jax.Array) -> jax.Array:
    """Follows the geodesic from unit ``m`` along ``tangent``; re-normalised against drift."""
    a = jnp.linalg.norm(tangent)
    sinc = jnp.where(a > _TINY, jnp.sin(a) / jnp.where(a > _TINY, a, 1.0), 1.0)
    step = jnp.cos(a) * m + sinc * tangent
    norm = jnp.linalg.norm(step)
    return step / jnp.where(norm > 0, norm, 1.0)


def chordal_direction(units: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(normalise(sum_i w_i u_i), defined) where ``defined`` is False if the sum vanishes."""
    mean = _dot(w, units)
    norm = jnp.linalg.norm(mean)
    defined = norm > EPS
    return mean / jnp.where(defined, norm, 1.0), defined


def karcher_direction(
    units: jax.Array, w: jax.Array, start: jax.Array, *, max_iter: int, tol: float
) -> tuple[jax.Array, jax.Array]:
    """Riemannian gradient steps from ``start`` until the step is shorter than ``tol``.

    Returns (mean direction, number of steps taken). The weights ``w`` must sum to one over the
    rows that have a direction; a zero row contributes nothing.
    """

    def step(state):
        i, m, _ = state
        tangent = _dot(w, log_map(m, units))
        return i + 1, exp_map(m, tangent), jnp.linalg.norm(tangent)

    def unfinished(state):
        i, _, size = state
        return (i < max_iter) & (size > tol)

    init = (jnp.asarray(0), start, jnp.asarray(jnp.inf, start.dtype))
    steps, mean, _ = jax.lax.while_loop(unfinished, step, init)
    return mean, steps


# Jitted so that eager callers compile the Karcher loop once per leaf shape, not per call.
@functools.partial(jax.jit, static_argnames=("max_iter", "tol"))
def sphere_mean(
    flat: jax.Array, weights: jax.Array, *, max_iter: int = 0, tol: float = 0.0
) -> jax.Array:
    """Merged vector of the rows of ``flat`` (n, d): mean direction times weighted mean norm.

    ``max_iter=0`` gives the chordal direction; ``max_iter > 0`` refines it to the Karcher mean.
    ``weights`` are non-negative and sum to one. Rows with norm <= ``EPS`` take no part in the
    direction and count as norm 0.
    """
    w = _f32(weights)
    units, norms, has = split(flat)
    # Renormalise the weights over the rows that have a direction.
    w_dir = jnp.where(has, w, 0.0)
    w_dir = w_dir / jnp.where(jnp.sum(w_dir) > 0, jnp.sum(w_dir), 1.0)
    direction, defined = chordal_direction(units, w_dir)
    if max_iter > 0:
        direction, _ = karcher_direction(units, w_dir, direction, max_iter=max_iter, tol=tol)
    merged = direction * jnp.sum(w * norms)
    return jnp.where(defined, merged, _dot(w, flat))


def merge_leaves(
    model_leaves: Sequence[jax.Array],
    base_leaf: jax.Array | None,
    weights: Sequence[float],
    *,
    max_iter: int = 0,
    tol: float = 0.0,
    mask: jax.Array | None = None,
    granularity: str = "leaf",
) -> jax.Array:
    """``sphere_mean`` of one leaf across models (of the task vectors if a base is given).

    ``granularity="row"`` takes one mean per row (the last axis, as in SLERP; leaves with
    fewer than two axes are one row). With a bool ``mask`` only the selected entries enter the
    norms and directions, and the unselected entries are returned as in ``models[0]``.
    """
    shape, dtype = model_leaves[0].shape, model_leaves[0].dtype
    stack = jnp.stack([_f32(x) for x in model_leaves])
    origin = _f32(base_leaf) if base_leaf is not None else jnp.zeros(shape, jnp.float32)
    vectors = stack - origin[None]
    if mask is not None:
        vectors = jnp.where(mask[None], vectors, 0.0)
    w = _f32(weights)
    mean = functools.partial(sphere_mean, max_iter=max_iter, tol=tol)
    n = len(model_leaves)
    if granularity == "row" and len(shape) >= 2:
        rows = vectors.reshape(n, -1, shape[-1]).transpose(1, 0, 2)  # (rows, n, row length)
        merged = jax.vmap(mean, in_axes=(0, None))(rows, w).reshape(shape)
    else:
        merged = mean(vectors.reshape(n, -1), w).reshape(shape)
    merged = merged + origin
    if mask is not None:
        merged = jnp.where(mask, merged, stack[0])
    return merged.astype(dtype)


def normalized_weights(weights, n: int, operator: str) -> list[float]:
    """Non-negative weights scaled to sum to one (``None``: equal)."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries for {n} models")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"{operator} needs non-negative weights with a positive sum, got {w}")
    return [x / sum(w) for x in w]
