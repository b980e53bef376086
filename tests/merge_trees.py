"""Small random pytrees and float64 checks shared by the merge-operator reference tests."""

import jax
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


def fine_tunes(n=3, shared=0.0):
    """A base and n models base + update; ``shared`` mixes in a common update so cores overlap."""
    base, common = tree(0), tree(99, 0.1)
    models = [
        jax.tree.map(lambda b, c, u: b + shared * c + u, base, common, tree(10 + i, 0.1))
        for i in range(n)
    ]
    return models, base


def as64(t):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]


def check(out, expected_leaves, rtol=1e-5, atol=1e-6):
    """Every leaf of ``out`` equals the float64 reference leaf to ``rtol`` / ``atol``."""
    for got, want in zip(jax.tree.leaves(out), expected_leaves):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)
