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

from cpift_jax.merges._common import check_models, f32, resolve_weights

INTERPOLATION_ENDPOINTS = (({"weights": (1.0, 0.0)}, 0), ({"weights": (0.0, 1.0)}, 1))


def merge(models: Sequence, *, base=None, weights: Sequence[float] | None = None, normalize=True):
    check_models(models, base)
    w = resolve_weights(weights, len(models))
    total = sum(w)
    if normalize:
        if total == 0:
            raise ValueError("linear merge weights sum to zero")
        w = [wi / total for wi in w]

    def leaf(*xs):
        acc = sum(wi * f32(x) for wi, x in zip(w, xs))
        return acc.astype(xs[0].dtype)

    return jax.tree.map(leaf, *models)
