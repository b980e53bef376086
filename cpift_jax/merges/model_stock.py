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
from cpift_jax.merges._common import f32

REQUIRES_BASE = True
MIN_MODELS = 2


@jax.jit
def ratio(stack: jax.Array) -> jax.Array:
    """Interpolation ratio t of one leaf from its ``(N, *shape)`` task vectors."""
    n = stack.shape[0]
    flat = stack.reshape(n, -1)
    norms = jnp.linalg.norm(flat, axis=1)
    unit = flat / jnp.where(norms > 0, norms, 1.0)[:, None]
    gram = jnp.dot(unit, unit.T, precision=jax.lax.Precision.HIGHEST)
    upper = jnp.triu(jnp.ones((n, n), bool), k=1)
    cos = jnp.clip(jnp.sum(jnp.where(upper, gram, 0.0)) / (n * (n - 1) / 2), 0.0, 1.0)
    return n * cos / (1.0 + (n - 1) * cos)


def merge(models: Sequence, *, base=None, weights=None):
    inputs = tv.flat_inputs(models, base, operator="model_stock", require_base=True, min_models=2)
    if weights is not None:
        raise ValueError(
            "model_stock averages the models uniformly (Jang et al.); weights must be None"
        )
    return inputs.unflatten([_merge_leaf(xs, b) for xs, b in zip(inputs.models, inputs.base)])


@jax.jit
def _merge_leaf(model_leaves, base_leaf):
    t = ratio(tv.deltas(model_leaves, base_leaf))
    average = sum(f32(x) for x in model_leaves) / len(model_leaves)
    return (t * average + (1.0 - t) * f32(base_leaf)).astype(base_leaf.dtype)
