"""Task arithmetic: add a scaled sum of task vectors to the base.

    merged = base + scale * sum_i w_i (theta_i - base)

Ilharco et al., 2023, "Editing Models with Task Arithmetic" (ICLR). Weights default to 1 each
(the paper's plain sum); ``scale`` is the paper's lambda (default 1.0; with n models
``scale=1/n`` gives their average, and the paper tunes it on validation data, typically
0.3-0.5). ``scale`` may be a pytree of per-leaf scalars (see ``cpift_jax.hparams``).

Steps: (1) task vectors delta_i = theta_i - base, (2) weighted sum, (3) scale and add to base.
Float32 inside, the input dtype out.
Degenerate cases: models equal to base give base back; one model with weight 1 and
``scale=1`` gives that model back; negative weights (subtracting a task) are allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cpift_jax.merges import _task_vectors as tv
from cpift_jax.merges._common import leaf_program

REQUIRES_BASE = True
MIN_MODELS = 1
MAX_MODELS = None
EXAMPLE_HPARAMS = {"scale": 0.5}
PER_LEAF_HPARAMS = ("scale",)
INTERPOLATION_ENDPOINTS = (
    ({"weights": (1.0, 0.0), "scale": 1.0}, 0),
    ({"weights": (0.0, 1.0), "scale": 1.0}, 1),
)


@leaf_program
def merge_leaf(base, models, w, scale):
    """One leaf: ``base + scale * sum_i w_i (theta_i - base)``."""
    return tv.add_to_base(base, tv.weighted_sum(tv.deltas(models, base), w), scale)


def merge(models: Sequence, *, base=None, weights: Sequence[float] | None = None, scale=1.0,
          donate: bool = False):
    """``donate=True``: the caller gives up ``base`` (its buffers may hold the result)."""
    inputs = tv.flat_inputs(models, base, operator="task_arithmetic", require_base=True)
    w = tv.float32s(tv.task_weights(weights, len(models), nonnegative=False))
    scales = tv.check_per_leaf(
        inputs.per_leaf(scale, "scale"), inputs.paths, "scale", math.isfinite, "finite"
    )
    return tv.run_leaves(merge_leaf, inputs, lambda j: (w, np.float32(scales[j])), donate=donate)
