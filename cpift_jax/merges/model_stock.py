"""Model Stock: move from the base towards the average by a ratio set by the models' angle.

Jang et al., 2024, "Model Stock: All we need is just a few fine-tuned models" (ECCV).

Per leaf, with N >= 2 fine-tuned models and the base (pre-trained) w_0:
1. Task vectors delta_i = w_i - w_0, flattened.
2. cos(theta) = mean over pairs i < j of cos(delta_i, delta_j) (the paper assumes one angle;
   the mean of pairwise cosines is mergekit's reading of it).
3. t = N cos / (1 + (N - 1) cos).
4. merged = t * mean_i(w_i) + (1 - t) * w_0.

Choices: cos is clipped to [0, 1] so t stays in [0, 1] (mergekit does not clip: a negative
mean cosine would extrapolate away from the average, and 1 + (N-1) cos -> 0 makes t blow up).
A zero task vector has cosine 0 with everything (no NaN). The average is unweighted, as in the
paper, so ``weights`` must be None. Float32 inside, the input dtype out.
Degenerate cases: all models equal to the base give the base; identical task vectors give
cos = 1, t = 1, the models' average; orthogonal ones give t = 0, the base.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from cpift_jax.merges import _task_vectors as tv
from cpift_jax.merges._common import f32, leaf_program

REQUIRES_BASE = True
MIN_MODELS = 2  # the ratio t comes from the angle between task vectors
MAX_MODELS = None


def ratio(parts) -> jax.Array:
    """Interpolation ratio t of one leaf from its N float32 task vectors: the mean pairwise
    cosine (clipped to [0, 1]) mapped through t = N cos / (1 + (N - 1) cos)."""
    n = len(parts)
    norms = [jnp.sqrt(jnp.sum(p * p)) for p in parts]
    safe = [jnp.where(m > 0, m, 1.0) for m in norms]
    cosines = [jnp.sum(parts[i] * parts[j]) / (safe[i] * safe[j])
               for i in range(n) for j in range(i + 1, n)]
    cos = jnp.clip(sum(cosines) / (n * (n - 1) / 2), 0.0, 1.0)
    return n * cos / (1.0 + (n - 1) * cos)


@leaf_program(reduction=True)
def merge_leaf(base, models):
    """One leaf: ``t * mean(models) + (1 - t) * base``."""
    t = ratio(tv.deltas(models, base))
    average = sum(f32(x) for x in models) / len(models)
    return (t * average + (1.0 - t) * f32(base)).astype(base.dtype)


def merge(models: Sequence, *, base=None, weights=None, donate: bool = False):
    """``donate=True``: the caller gives up ``base`` (its buffers may hold the result)."""
    inputs = tv.flat_inputs(models, base, operator="model_stock", require_base=True, min_models=2)
    if weights is not None:
        raise ValueError(
            "model_stock averages the models uniformly (Jang et al.); weights must be None"
        )
    return tv.run_leaves(merge_leaf, inputs, lambda j: (), donate=donate)
