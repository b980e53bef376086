"""Linear (weighted-average) merge.

    merged = sum_i w_i * theta_i / sum_i w_i        (Wortsman et al., 2022, "Model soups")

Weights default to equal; they are normalised to sum to one. With ``base`` given it is ignored
(a plain average needs no base). Computed in float32, cast back to the input dtype.
``normalize=False`` uses the weights as given (sum_i w_i theta_i).
Degenerate cases: one model returns that model; identical models give that model back (up to
float32 rounding of sum_i w_i = 1); weights (1, 0) give the first model exactly; weights
summing to zero raise ``ValueError`` when normalising.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from cpift_jax.merges._common import check_models, donatable, f32, leaf_program, resolve_weights
from cpift_jax.merges._task_vectors import float32s, weighted_sum

REQUIRES_BASE = False
MIN_MODELS = 1
MAX_MODELS = None
INTERPOLATION_ENDPOINTS = (({"weights": (1.0, 0.0)}, 0), ({"weights": (0.0, 1.0)}, 1))


@leaf_program
def merge_leaf(first, rest, w):
    """One leaf: ``sum_i w_i theta_i`` in float32, in the first model's dtype."""
    return weighted_sum([f32(x) for x in (first, *rest)], w).astype(first.dtype)


def merge(models: Sequence, *, base=None, weights: Sequence[float] | None = None, normalize=True,
          donate: bool = False):
    """``donate=True``: the caller gives up ``models[0]`` (its buffers may hold the result)."""
    check_models(models, base)
    w = resolve_weights(weights, len(models))
    total = sum(w)
    if normalize:
        if total == 0:
            raise ValueError("linear merge weights sum to zero")
        w = [wi / total for wi in w]
    w = float32s(w)
    owns = donatable((models, base), donate)  # an array also passed as base is not given up
    return jax.tree.map(lambda x, *rest: merge_leaf(x, rest, w, donate=owns(x)), *models)
