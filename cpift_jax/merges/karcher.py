"""Karcher mean: the weighted Riemannian (Frechet) mean of the models' directions.

Karcher, 1977; Buss & Fillmore, 2001, "Spherical averages and applications to spherical splines
and interpolation" (ACM TOG). mergekit has the same operator (``karcher``). Per leaf, flattened:
1. Vectors x_i: the models, or their task vectors x_i = theta_i - base when ``base`` is given.
2. Split into directions u_i = x_i / ||x_i|| and norms.
3. Start from m = normalise(sum_i w_i u_i) (the ``multislerp`` direction) and repeat
   g = sum_i w_i log_m(u_i);  m <- exp_m(g)
   until ||g|| < ``tol`` or ``max_iter`` steps (log/exp: the sphere's logarithm and exponential
   maps; the fixed point minimises sum_i w_i angle(m, u_i)^2).
4. merged = m * sum_i w_i ||x_i||  (+ base).

For two models of equal norm with weights (1 - t, t) this is exactly SLERP at t. Defaults
``max_iter=10``, ``tol=1e-5`` (mergekit's); the loop is a ``lax.while_loop``, so it stops early
under jit as well. ``granularity="row"`` and ``mask`` work as in ``multislerp``. Weights default
to equal and are normalised. Float32 inside, the input dtype out.
Degenerate cases as in ``multislerp``: zero vectors take no part in the direction,
cancelling directions fall back to the weighted linear average, all-zero inputs give zero.
The mean is unique when the directions lie in an open hemisphere; otherwise the iteration
still stops after ``max_iter`` steps at a finite point.
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
EXAMPLE_HPARAMS = {"max_iter": 5}


# One compiled program per leaf shape (sphere.merge_leaves under jit); no donation: the
# inputs are read again after the output is written.
merge_leaf = leaf_program(sphere.merge_leaves, static_argnames=("max_iter", "tol", "granularity"),
                          donate_argnums=())


def merge(
    models: Sequence,
    *,
    base=None,
    weights: Sequence[float] | None = None,
    max_iter: int = 10,
    tol: float = 1e-5,
    mask=None,
    granularity: str = "leaf",
):
    inputs = tv.flat_inputs(models, base, operator="karcher")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    tv.check_choice(granularity, "granularity", sphere.GRANULARITIES)
    w = tv.float32s(sphere.normalized_weights(weights, len(models), "karcher"))
    masks = tv.mask_leaves(mask, inputs)
    out = [
        merge_leaf(
            xs, b, w, max_iter=max_iter, tol=tol, mask=m, granularity=granularity
        )
        for xs, b, m in zip(inputs.models, inputs.base, masks)
    ]
    return inputs.unflatten(out)
