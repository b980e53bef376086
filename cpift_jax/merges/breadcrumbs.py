"""Model Breadcrumbs: drop both the largest outliers and the small tail of each task vector.

Davari & Belilovsky, 2024, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks" (ECCV).

1. Task vectors delta_i = theta_i - base.
2. Mask: rank |delta_i| (per leaf, or over the whole task vector with ``scope="global"``);
   drop the top ``gamma`` fraction (outliers) and keep the next ``density`` fraction; the
   rest (small perturbations) is dropped too.
3. Combine the masked task vectors: ``combine="linear"``: base + scale * sum_i w_i masked_i
   (the paper); ``"ties"``: sign election and disjoint mean (mergekit's breadcrumbs_ties).

Defaults: ``density=0.1`` and ``gamma=0.01`` (a 90%-sparse mask without the top 1%; a starting
point to tune per benchmark, as the paper does), ``scale=1.0``, weights 1 each,
``combine="linear"``, ``scope="leaf"`` (mergekit's per-tensor ranking; see ``_sparsify``).
``density``, ``gamma`` and ``scale`` may be per-leaf pytrees (``scope="leaf"``). Float32 inside,
the input dtype out.
Degenerate cases: ``density=1, gamma=0`` is task arithmetic; ``density=0`` returns base;
models equal to base give base back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

from cpift_jax.merges import _sparsify
from cpift_jax.merges import _task_vectors as tv

REQUIRES_BASE = True
EXAMPLE_HPARAMS = {"density": 0.5, "gamma": 0.1}
PER_LEAF_HPARAMS = ("density", "gamma", "scale")
INTERPOLATION_ENDPOINTS = (
    ({"weights": (1.0, 0.0), "density": 1.0, "gamma": 0.0}, 0),
    ({"weights": (0.0, 1.0), "density": 1.0, "gamma": 0.0}, 1),
)


def merge(
    models: Sequence,
    *,
    base=None,
    weights: Sequence[float] | None = None,
    density=0.1,
    gamma=0.01,
    scale=1.0,
    combine: str = "linear",
    sign_method: str = "sum",
    scope: str = "leaf",
):
    inputs = tv.flat_inputs(models, base, operator="breadcrumbs", require_base=True)
    tv.check_choice(combine, "combine", tv.COMBINE_METHODS)
    tv.check_choice(sign_method, "sign_method", tv.SIGN_METHODS)
    tv.check_choice(scope, "scope", _sparsify.SCOPES)
    w = tv.task_weights(weights, len(models), nonnegative=combine == "ties")
    in_unit = (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
    densities, gammas = (
        tv.check_per_leaf(inputs.per_leaf(value, name), inputs.paths, name, *in_unit)
        for value, name in ((density, "density"), (gamma, "gamma"))
    )
    scales = tv.check_per_leaf(
        inputs.per_leaf(scale, "scale"), inputs.paths, "scale", math.isfinite, "finite"
    )
    stacks = [tv.deltas(xs, b) for xs, b in zip(inputs.models, inputs.base)]
    keep = _sparsify.per_task(stacks, lambda s: _sparsify.band(s, densities, gammas, scope))
    out = [
        tv.add_to_base(b, tv.combine(jnp.where(k, st, 0.0), w, combine, sign_method), sc)
        for k, st, b, sc in zip(keep, stacks, inputs.base, scales)
    ]
    return inputs.unflatten(out)
