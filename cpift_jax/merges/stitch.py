"""Localize-and-Stitch, dataless variant: top-k magnitude masks per task, overlaps averaged.

He et al., 2024, "Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic"
(TMLR). The paper's dataless localisation keeps the largest-magnitude entries of each task
vector; stitching averages the tasks where their regions overlap.

1. Task vectors delta_i = theta_i - base.
2. Localise: m_i = top-``density`` |delta_i| (per leaf, or over the whole task vector with
   ``scope="global"``, the paper's ranking).
3. Stitch: merged = base + sum_i w_i m_i delta_i / sum_i w_i m_i, i.e. each entry takes the
   (weighted) mean of the tasks that localised it, and stays at base where none did. With
   equal weights this is the paper's division by the number of covering masks.

Defaults: ``density=0.1``, weights 1 each, ``scope="leaf"`` (the library-wide default, see
``_sparsify``; pass ``scope="global"`` for the paper's ranking). ``density`` may be a per-leaf
pytree (``scope="leaf"``). Float32 inside, the input dtype out.
Degenerate cases: models equal to base give base back; ``density=1`` is the weighted average
of the task vectors (a linear merge); ``density=0`` returns base.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence

import jax.numpy as jnp

from cpift_jax.merges import _sparsify
from cpift_jax.merges import _task_vectors as tv
from cpift_jax.merges._common import leaf_program

REQUIRES_BASE = True
MIN_MODELS = 1
MAX_MODELS = None
EXAMPLE_HPARAMS = {"density": 0.5}
PER_LEAF_HPARAMS = ("density",)
INTERPOLATION_ENDPOINTS = (
    ({"weights": (1.0, 0.0), "density": 1.0}, 0),
    ({"weights": (0.0, 1.0), "density": 1.0}, 1),
)


def stitch(parts, keep, w) -> jnp.ndarray:
    """Mean of the kept task vectors over the tasks covering each entry (0 where none)."""
    covered = [jnp.where(k, wi, 0.0) for k, wi in zip(keep, jnp.asarray(w, jnp.float32))]
    total = functools.reduce(operator.add, covered)
    num = functools.reduce(operator.add, [c * p for c, p in zip(covered, parts)])
    return jnp.where(total > 0, num / jnp.where(total > 0, total, 1.0), 0.0)


@leaf_program
def merge_leaf(base, models, w, cuts, lasts, masks):
    """One leaf: the stitched task vector added to base."""
    parts = tv.deltas(models, base)
    return tv.add_to_base(base, stitch(parts, _sparsify.kept(parts, cuts, lasts, masks), w), 1.0)


def merge(
    models: Sequence,
    *,
    base=None,
    weights: Sequence[float] | None = None,
    density=0.1,
    scope: str = "leaf",
    donate: bool = False,
):
    """``donate=True``: the caller gives up ``base`` (its buffers may hold the result)."""
    inputs = tv.flat_inputs(models, base, operator="stitch", require_base=True)
    tv.check_choice(scope, "scope", _sparsify.SCOPES)
    w = tv.float32s(tv.task_weights(weights, len(models), nonnegative=True))
    densities = tv.check_per_leaf(
        inputs.per_leaf(density, "density"), inputs.paths, "density",
        lambda d: 0.0 <= d <= 1.0, "in [0, 1]",
    )
    keeps = _sparsify.top_fraction(inputs.base, inputs.models, densities, scope, paths=inputs.paths)
    return tv.run_leaves(merge_leaf, inputs, lambda j: (w, *keeps[j].args()), donate=donate)
