"""Multi-SLERP: one-step barycentric interpolation of any number of models on the sphere.

Generalises SLERP to n models as mergekit's ``multislerp`` does (Goddard, 2024, "Multi-SLERP",
https://goddard.blog/posts/multislerp-wow-what-a-cool-idea). Per leaf, flattened:
1. Vectors x_i: the models, or their task vectors x_i = theta_i - base when ``base`` is given.
2. Split into directions u_i = x_i / ||x_i|| and norms.
3. Direction: m = normalise(sum_i w_i u_i), the weighted mean of the directions projected back
   to the sphere in one step. (mergekit also projects the u_i onto the tangent space at m and
   averages them, but that average is exactly zero, so its result is this m too; the exact
   Riemannian mean is the ``karcher`` operator, whose first iterate starts here.)
4. merged = m * sum_i w_i ||x_i||  (+ base).

Options shared with ``slerp`` (so ``fusion`` can swap the rules): ``granularity="row"`` takes one
mean per row (the last axis; leaves with fewer than two axes are one row); a bool pytree
``mask`` restricts norms and directions to the selected entries and returns the other entries
as in ``models[0]``. Weights default to equal and are normalised to sum to one. Float32 inside,
the input dtype out.
Degenerate cases: one model (or identical models) gives it back; weight 1 on one model gives
that model; zero vectors take no part in the direction; directions that cancel (x and -x with
equal weights) fall back to the weighted linear average (mergekit raises for n > 2); all-zero
vectors give zero (the base, with a base).
"""

from __future__ import annotations

from collections.abc import Sequence

from cpift_jax import sphere
from cpift_jax.merges import _task_vectors as tv
from cpift_jax.merges._common import leaf_program

REQUIRES_BASE = False
MIN_MODELS = 1
MAX_MODELS = None
INTERPOLATION_ENDPOINTS = (({"weights": (1.0, 0.0)}, 0), ({"weights": (0.0, 1.0)}, 1))


# One compiled program per leaf shape (sphere.merge_leaves under jit); no donation: the
# inputs are read again after the output is written.
merge_leaf = leaf_program(sphere.merge_leaves, static_argnames=("max_iter", "tol", "granularity"),
                          donate_argnums=())


def merge(
    models: Sequence,
    *,
    base=None,
    weights: Sequence[float] | None = None,
    mask=None,
    granularity: str = "leaf",
):
    inputs = tv.flat_inputs(models, base, operator="multislerp")
    tv.check_choice(granularity, "granularity", sphere.GRANULARITIES)
    w = tv.float32s(sphere.normalized_weights(weights, len(models), "multislerp"))
    masks = tv.mask_leaves(mask, inputs)
    out = [
        merge_leaf(xs, b, w, mask=m, granularity=granularity)
        for xs, b, m in zip(inputs.models, inputs.base, masks)
    ]
    return inputs.unflatten(out)
