"""Weighted means on the unit sphere, shared by multislerp and karcher (not an operator).

Each leaf is one vector (its entries flattened). Vectors are split into direction and norm;
the directions are averaged on the sphere and the result is rescaled by the weighted mean of
the norms, so merging vectors of equal norm keeps that norm (linear averaging shrinks it).

- ``chordal_direction``: normalise(sum_i w_i u_i), the weighted mean in the ambient space
  projected back to the sphere (closed form, one step).
- ``karcher_direction``: the weighted Riemannian (Karcher / Frechet) mean, the minimiser of
  sum_i w_i d(m, u_i)^2 with geodesic distance d; found by Riemannian gradient steps
  m <- exp_m(sum_i w_i log_m(u_i)) from the chordal mean (Karcher, 1977; Buss & Fillmore, 2001).

Vectors with norm <= ``EPS`` have no direction: they take no part in the direction and count
as norm 0 in the rescaling. If the weighted unit vectors cancel (antipodal inputs) the direction
is undefined and the result falls back to the weighted linear average of the vectors.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cpift_jax.merges._common import f32

# Norms below this are treated as zero (mergekit's SLERP leaves norms below 1e-8 alone too).
EPS = 1e-8
# Below this a tangent vector is zero; theta/sin(theta) and sin(a)/a are then 1.
_TINY = 1e-12


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)


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
    ``weights`` are non-negative and sum to one.
    """
    w = jnp.asarray(weights, jnp.float32)
    units, norms, has = split(flat)
    # Renormalise the weights over the rows that have a direction.
    w_dir = jnp.where(has, w, 0.0)
    w_dir = w_dir / jnp.where(jnp.sum(w_dir) > 0, jnp.sum(w_dir), 1.0)
    direction, defined = chordal_direction(units, w_dir)
    if max_iter > 0:
        direction, _ = karcher_direction(units, w_dir, direction, max_iter=max_iter, tol=tol)
    merged = direction * jnp.sum(w * norms)
    return jnp.where(defined, merged, _dot(w, flat))


GRANULARITIES = ("leaf", "row")


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

    ``granularity="row"`` takes one mean per row (the last axis, as in ``slerp``; leaves with
    fewer than two axes are one row). With a bool ``mask`` only the selected entries enter the
    norms and directions, and the unselected entries are returned as in ``models[0]``.
    """
    shape, dtype = model_leaves[0].shape, model_leaves[0].dtype
    stack = jnp.stack([f32(x) for x in model_leaves])
    origin = f32(base_leaf) if base_leaf is not None else jnp.zeros(shape, jnp.float32)
    vectors = stack - origin[None]
    if mask is not None:
        vectors = jnp.where(mask[None], vectors, 0.0)
    w = jnp.asarray(weights, jnp.float32)
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
