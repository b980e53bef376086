"""Consensus merging: keep only the entries that at least k tasks' TALL masks select.

Wang et al., 2024, "Localizing Task Information for Improved Model Merging and Compression"
(ICML).

1. Task vectors delta_t = theta_t - base.
2. Multi-task vector tau: ``combine="linear"``: sum_t w_t delta_t (task arithmetic, the
   paper's default); ``"ties"``: the TIES merged vector (trim to ``density`` with ``scope``,
   sign election, disjoint mean).
3. TALL mask of each task: m_t = |delta_t| >= ``tall_lambda`` * |tau - delta_t| (entries where
   the task matters more than the other tasks together).
4. Consensus: keep the entries where at least ``min_agreement`` (k) masks agree; this drops
   "selfish" entries (one task only) and "catastrophic" ones (no task).
5. merged = base + scale * consensus * tau.

Defaults: ``min_agreement=2`` (the paper's k), ``tall_lambda=0.6`` (the paper tunes lambda per
task in [0.2, 0.6] on validation data; 0.6 is FusionBench's default), ``combine="linear"``,
``scale=1.0`` (tune it as for task arithmetic, e.g. 1/n for an average), weights 1 each,
``density=0.2`` and ``scope="leaf"`` for the TIES variant. ``tall_lambda``, ``scale`` and
``density`` may be per-leaf pytrees. Float32 inside, the input dtype out.
Degenerate cases: one model with the default k = 2 keeps nothing and returns base; with
``min_agreement=1`` and one task of weight 1 every entry passes (|tau - delta| = 0) and the
result is that model; models equal to base give base back.
"""

from __future__ import annotations

import math
import functools
import operator
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from cpift_jax.merges import _sparsify
from cpift_jax.merges import _task_vectors as tv
from cpift_jax.merges._common import leaf_program

REQUIRES_BASE = True
MIN_MODELS = 1
MAX_MODELS = None
EXAMPLE_HPARAMS = {"tall_lambda": 0.4, "scale": 0.5}
PER_LEAF_HPARAMS = ("tall_lambda", "scale", "density")
INTERPOLATION_ENDPOINTS = (
    ({"weights": (1.0, 0.0), "min_agreement": 1, "scale": 1.0}, 0),
    ({"weights": (0.0, 1.0), "min_agreement": 1, "scale": 1.0}, 1),
)


def tall_masks(parts, tau: jnp.ndarray, tall_lambda) -> list[jnp.ndarray]:
    """TALL masks per task: |delta_t| >= lambda * |tau - delta_t|."""
    return [jnp.abs(p) >= tall_lambda * jnp.abs(tau - p) for p in parts]


@leaf_program(static_argnames=("combine", "sign_method"))
def merge_leaf(base, models, w, tall_lambda, min_agreement, scale, cuts, lasts, masks, *,
               combine="linear", sign_method="sum"):
    """One leaf: tau (task arithmetic or TIES), kept where enough TALL masks agree."""
    parts = tv.deltas(models, base)
    if combine == "ties":
        kept = _sparsify.kept(parts, cuts, lasts, masks)
        tau = tv.ties_combine([jnp.where(k, p, 0.0) for k, p in zip(kept, parts)], w, sign_method)
    else:
        tau = tv.weighted_sum(parts, w)
    votes = functools.reduce(
        operator.add, [m.astype(jnp.int32) for m in tall_masks(parts, tau, tall_lambda)])
    return tv.add_to_base(base, jnp.where(votes >= min_agreement, tau, 0.0), scale)


def merge(
    models: Sequence,
    *,
    base=None,
    weights: Sequence[float] | None = None,
    min_agreement: int = 2,
    tall_lambda=0.6,
    scale=1.0,
    combine: str = "linear",
    density=0.2,
    sign_method: str = "sum",
    scope: str = "leaf",
    donate: bool = False,
):
    """``donate=True``: the caller gives up ``base`` (its buffers may hold the result)."""
    inputs = tv.flat_inputs(models, base, operator="consensus", require_base=True)
    tv.check_choice(combine, "combine", tv.COMBINE_METHODS)
    tv.check_choice(sign_method, "sign_method", tv.SIGN_METHODS)
    tv.check_choice(scope, "scope", _sparsify.SCOPES)
    if not isinstance(min_agreement, int) or min_agreement < 0:
        raise ValueError(f"min_agreement must be an int >= 0, got {min_agreement!r}")
    w = tv.float32s(tv.task_weights(weights, len(models), nonnegative=combine == "ties"))
    lambdas = tv.check_per_leaf(
        inputs.per_leaf(tall_lambda, "tall_lambda"), inputs.paths, "tall_lambda",
        lambda v: v >= 0.0, ">= 0",
    )
    scales = tv.check_per_leaf(
        inputs.per_leaf(scale, "scale"), inputs.paths, "scale", math.isfinite, "finite"
    )
    keeps = [_sparsify.Keep(None)] * len(inputs.paths)  # TIES trimming only
    if combine == "ties":
        densities = tv.check_per_leaf(
            inputs.per_leaf(density, "density"), inputs.paths, "density",
            lambda d: 0.0 <= d <= 1.0, "in [0, 1]",
        )
        keeps = _sparsify.top_fraction(inputs.base, inputs.models, densities, scope,
                                       paths=inputs.paths)
    return tv.run_leaves(
        merge_leaf, inputs,
        lambda j: (w, np.float32(lambdas[j]), np.int32(min_agreement), np.float32(scales[j]),
                   *keeps[j].args()),
        donate=donate, combine=combine, sign_method=sign_method,
    )
