"""TIES-merging: trim, elect sign, disjoint mean.

Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS).

1. Trim: keep the top ``density`` fraction of each task vector delta_i = theta_i - base by
   magnitude, zero the rest. ``scope="leaf"`` ranks each leaf separately (mergekit's default,
   and ours: a global ranking lets the leaves with the largest updates, often embeddings, take
   the whole budget); ``scope="global"`` ranks the whole task vector as the paper does.
2. Elect: per entry, gamma = sign(sum_i w_i trimmed_i) (``sign_method="sum"``, the paper's
   "largest total magnitude") or the majority sign (``"count"``).
3. Disjoint mean: average, weighted by w_i, only the trimmed entries whose sign is gamma.
4. merged = base + scale * mean.

Defaults: ``density=0.2`` (the paper's k = 20%), ``scale=1.0`` (lambda), weights 1 each,
``sign_method="sum"``, ``scope="leaf"``. ``density`` and ``scale`` may be per-leaf pytrees
(``scope="leaf"`` only for a per-leaf density). Float32 inside, the input dtype out.
Degenerate cases: models equal to base give base back; an entry nobody kept, or with a tied
vote, merges to base; ``density=1`` with one model of weight 1 gives that model back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cpift_jax.merges import _sparsify
from cpift_jax.merges import _task_vectors as tv

REQUIRES_BASE = True
EXAMPLE_HPARAMS = {"density": 0.5}
PER_LEAF_HPARAMS = ("density", "scale")
INTERPOLATION_ENDPOINTS = (
    ({"weights": (1.0, 0.0), "density": 1.0}, 0),
    ({"weights": (0.0, 1.0), "density": 1.0}, 1),
)


def trim(
    stacks: Sequence[jnp.ndarray], densities: Sequence[float], scope: str, paths=None
) -> list[jnp.ndarray]:
    """Zeroes all but the top-``density`` magnitudes of every task vector (stacks: per leaf)."""
    keep = _sparsify.per_task(
        stacks, lambda scores: _sparsify.top_fraction(scores, densities, scope, paths=paths)
    )
    return [_keep(k, s) for k, s in zip(keep, stacks)]


@jax.jit
def _keep(mask: jnp.ndarray, stack: jnp.ndarray) -> jnp.ndarray:
    return jnp.where(mask, stack, 0.0)


def merge(
    models: Sequence,
    *,
    base=None,
    weights: Sequence[float] | None = None,
    density=0.2,
    scale=1.0,
    sign_method: str = "sum",
    scope: str = "leaf",
):
    inputs = tv.flat_inputs(models, base, operator="ties", require_base=True)
    tv.check_choice(sign_method, "sign_method", tv.SIGN_METHODS)
    tv.check_choice(scope, "scope", _sparsify.SCOPES)
    w = tv.task_weights(weights, len(models), nonnegative=True)
    densities = tv.check_per_leaf(
        inputs.per_leaf(density, "density"), inputs.paths, "density",
        lambda d: 0.0 <= d <= 1.0, "in [0, 1]",
    )
    scales = tv.check_per_leaf(
        inputs.per_leaf(scale, "scale"), inputs.paths, "scale", math.isfinite, "finite"
    )
    stacks = [tv.deltas(xs, b) for xs, b in zip(inputs.models, inputs.base)]
    trimmed = trim(stacks, densities, scope, inputs.paths)
    out = [
        tv.add_to_base(b, tv.ties_combine(t, w, sign_method), s)
        for t, b, s in zip(trimmed, inputs.base, scales)
    ]
    return inputs.unflatten(out)
