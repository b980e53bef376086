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
import numpy as np

from cpift_jax.merges import _sparsify
from cpift_jax.merges import _task_vectors as tv
from cpift_jax.merges._common import leaf_program

REQUIRES_BASE = True
MIN_MODELS = 1
MAX_MODELS = None
EXAMPLE_HPARAMS = {"density": 0.5, "gamma": 0.1}
PER_LEAF_HPARAMS = ("density", "gamma", "scale")
INTERPOLATION_ENDPOINTS = (
    ({"weights": (1.0, 0.0), "density": 1.0, "gamma": 0.0}, 0),
    ({"weights": (0.0, 1.0), "density": 1.0, "gamma": 0.0}, 1),
)


@leaf_program(static_argnames=("combine", "sign_method"))
def merge_leaf(base, models, w, scale, cuts, lasts, masks, *, combine="linear", sign_method="sum"):
    """One leaf: keep each task vector's band, combine, add to base."""
    parts = tv.deltas(models, base)
    kept = [jnp.where(k, p, 0.0) for k, p in zip(_sparsify.kept(parts, cuts, lasts, masks), parts)]
    return tv.add_to_base(base, tv.combine(kept, w, combine, sign_method), scale)


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
    donate: bool = False,
):
    """``donate=True``: the caller gives up ``base`` (its buffers may hold the result)."""
    inputs = tv.flat_inputs(models, base, operator="breadcrumbs", require_base=True)
    tv.check_choice(combine, "combine", tv.COMBINE_METHODS)
    tv.check_choice(sign_method, "sign_method", tv.SIGN_METHODS)
    tv.check_choice(scope, "scope", _sparsify.SCOPES)
    w = tv.float32s(tv.task_weights(weights, len(models), nonnegative=combine == "ties"))
    in_unit = (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
    densities, gammas = (
        tv.check_per_leaf(inputs.per_leaf(value, name), inputs.paths, name, *in_unit)
        for value, name in ((density, "density"), (gamma, "gamma"))
    )
    scales = tv.check_per_leaf(
        inputs.per_leaf(scale, "scale"), inputs.paths, "scale", math.isfinite, "finite"
    )
    keeps = _sparsify.band(inputs.base, inputs.models, densities, gammas, scope, paths=inputs.paths)
    return tv.run_leaves(
        merge_leaf, inputs, lambda j: (w, np.float32(scales[j]), *keeps[j].args()),
        donate=donate, combine=combine, sign_method=sign_method,
    )
