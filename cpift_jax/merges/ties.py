"""TIES-merging: trim, elect sign, disjoint mean.

Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging Models" (NeurIPS).

1. Trim: keep the top ``density`` fraction of each task vector delta_i = theta_i - base by
   magnitude (exactly floor(density * n) entries, ties earliest first; see ``_sparsify``),
   zero the rest. ``scope="leaf"`` ranks each leaf separately (mergekit's default,
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

import jax.numpy as jnp
import numpy as np

from cpift_jax.merges import _sparsify
from cpift_jax.merges import _task_vectors as tv
from cpift_jax.merges._common import leaf_program

REQUIRES_BASE = True
MIN_MODELS = 1
MAX_MODELS = None
EXAMPLE_HPARAMS = {"density": 0.5}
PER_LEAF_HPARAMS = ("density", "scale")
INTERPOLATION_ENDPOINTS = (
    ({"weights": (1.0, 0.0), "density": 1.0}, 0),
    ({"weights": (0.0, 1.0), "density": 1.0}, 1),
)


@leaf_program(static_argnames=("sign_method",))
def merge_leaf(base, models, w, scale, cuts, lasts, masks, *, sign_method="sum"):
    """One leaf: trim each task vector to its kept entries, elect, disjoint mean, add."""
    parts = tv.deltas(models, base)
    keep = _sparsify.kept(parts, cuts, lasts, masks)
    trimmed = [jnp.where(k, p, 0.0) for k, p in zip(keep, parts)]
    return tv.add_to_base(base, tv.ties_combine(trimmed, w, sign_method), scale)


def merge(
    models: Sequence,
    *,
    base=None,
    weights: Sequence[float] | None = None,
    density=0.2,
    scale=1.0,
    sign_method: str = "sum",
    scope: str = "leaf",
    donate: bool = False,
):
    """``donate=True``: the caller gives up ``base`` (its buffers may hold the result)."""
    inputs = tv.flat_inputs(models, base, operator="ties", require_base=True)
    tv.check_choice(sign_method, "sign_method", tv.SIGN_METHODS)
    tv.check_choice(scope, "scope", _sparsify.SCOPES)
    w = tv.float32s(tv.task_weights(weights, len(models), nonnegative=True))
    densities = tv.check_per_leaf(
        inputs.per_leaf(density, "density"), inputs.paths, "density",
        lambda d: 0.0 <= d <= 1.0, "in [0, 1]",
    )
    scales = tv.check_per_leaf(
        inputs.per_leaf(scale, "scale"), inputs.paths, "scale", math.isfinite, "finite"
    )
    keeps = _sparsify.top_fraction(inputs.base, inputs.models, densities, scope, paths=inputs.paths)
    return tv.run_leaves(
        merge_leaf, inputs, lambda j: (w, np.float32(scales[j]), *keeps[j].args()),
        donate=donate, sign_method=sign_method,
    )
