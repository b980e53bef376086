"""Magnitude top-k masks shared by TIES, breadcrumbs, stitch and consensus (not an operator).

``scope="leaf"`` keeps the top ``round(density * leaf.size)`` entries of every leaf separately
(mergekit's per-tensor rule); ``scope="global"`` keeps the top ``round(density * N)`` entries of
the whole task vector, N being its total size (the papers' rule). Thresholds come from
``cpift_jax.select.threshold`` (exact k-th largest by counting passes, no sort), so an entry tied
with the k-th largest is kept too: a mask may hold more than k entries only through exact ties.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from cpift_jax import select

SCOPES = ("leaf", "global")


def keep_count(density: float, size: int) -> int:
    """Number of entries a ``density`` keeps out of ``size``: round half up, within [0, size]."""
    return min(size, max(0, int(density * size + 0.5)))


def top_k_mask(scores: Sequence[jax.Array], k: int) -> list[jax.Array]:
    """Masks of the ``k`` largest entries over all of ``scores`` (non-negative arrays)."""
    total = sum(int(s.size) for s in scores)
    if k <= 0:
        return [jnp.zeros(s.shape, bool) for s in scores]
    if k >= total:
        return [jnp.ones(s.shape, bool) for s in scores]
    cut = select.threshold(list(scores), k)
    return [s >= cut for s in scores]


def top_fraction(
    scores: Sequence[jax.Array], densities: Sequence[float], scope: str, *, paths=None
) -> list[jax.Array]:
    """Top-``density`` masks, per leaf or over all leaves (one density required for global)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be 'leaf' or 'global', got {scope!r}")
    if scope == "leaf":
        return [top_k_mask([s], keep_count(d, s.size))[0] for s, d in zip(scores, densities)]
    if len(set(densities)) > 1:
        first = next(j for j, d in enumerate(densities) if d != densities[0])
        where = ""
        if paths:
            where = f" (leaf '{paths[first]}' has {densities[first]}, not {densities[0]})"
        raise ValueError(
            "scope='global' ranks the whole task vector with one density, but per-leaf "
            f"densities were given{where}; use scope='leaf' or a scalar density"
        )
    total = sum(int(s.size) for s in scores)
    return top_k_mask(scores, keep_count(densities[0], total))


def band(
    scores: Sequence[jax.Array],
    densities: Sequence[float],
    gammas: Sequence[float],
    scope: str,
) -> list[jax.Array]:
    """Entries ranked below the top ``gamma`` fraction and within the next ``density`` fraction.

    ``top(gamma + density) & ~top(gamma)``: drops the largest outliers and the small tail
    (Model Breadcrumbs).
    """
    upper = [min(1.0, g + d) for g, d in zip(gammas, densities)]
    if scope == "global" and len(set(zip(densities, gammas))) > 1:
        raise ValueError(
            "scope='global' needs one density and one gamma; use scope='leaf' for per-leaf values"
        )
    outer = top_fraction(scores, upper, scope)
    outliers = top_fraction(scores, list(gammas), scope)
    return [keep & ~drop for keep, drop in zip(outer, outliers)]


def per_task(
    stacks: Sequence[jax.Array], choose: Callable[[list[jax.Array]], list[jax.Array]]
) -> list[jax.Array]:
    """Runs ``choose`` on each task's |delta| leaves; returns per-leaf ``(n, *shape)`` masks.

    ``stacks[j]`` is leaf j's float32 stack of task vectors, shape ``(n, *shape)``; a global
    ``choose`` thus ranks each task vector over all its leaves, never across tasks.
    """
    scores = [_magnitudes(s) for s in stacks]
    by_task = [choose([leaf[i] for leaf in scores]) for i in range(stacks[0].shape[0])]
    return [jnp.stack([task[j] for task in by_task]) for j in range(len(stacks))]


@jax.jit
def _magnitudes(stack: jax.Array) -> tuple[jax.Array, ...]:
    """|delta_i| of each task as separate arrays (one kernel instead of n slices)."""
    return tuple(jnp.abs(stack[i]) for i in range(stack.shape[0]))
