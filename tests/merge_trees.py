"""Small random pytrees shared by the merge-operator reference tests."""

import jax.numpy as jnp
import numpy as np


def f32(x):
    return jnp.asarray(x, jnp.float32)


def tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    # One set of shapes for every merge test file, so they share compiled kernels.
    return {
        "a": f32(scale * rng.normal(size=(6, 4))),
        "b": [f32(scale * rng.normal(size=5))],
        "c": f32(scale * rng.normal(size=(4, 5))),
    }
