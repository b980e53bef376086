"""Small random pytrees, float64 checks and the float64 SLERP reference shared by the merge tests."""

import math

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


def ref_slerp(a, b, t, mask=None, eps=1e-8, dot_threshold=0.9995):
    """SLERP of one leaf in float64, written from its definition (merges/slerp.py): the angle
    between the normalised copies over the selected entries (norms <= eps left alone), the
    coefficients on the originals, linear when |cos| > dot_threshold or sin(theta) = 0; the
    entries outside ``mask`` stay as in ``a``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    sel = np.ones(a.shape, bool) if mask is None else np.asarray(mask)
    av, bv = a[sel], b[sel]
    na, nb = np.linalg.norm(av), np.linalg.norm(bv)
    ua = av / na if na > eps else av
    ub = bv / nb if nb > eps else bv
    cos = float(np.sum(ua * ub))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    if abs(cos) > dot_threshold or math.sin(theta) <= 0:
        out = (1 - t) * a + t * b
    else:
        out = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    return np.where(sel, out, a)


def ref_fold(models, ts=None, weights=None):
    """acc_1 = m_1, acc_i = ref_slerp(acc_{i-1}, m_i; t_i) in float64, with t_2..t_n given as
    ``ts`` or from ``weights``: t_i = w_i / (w_1 + ... + w_i) (0 while that sum is 0);
    equal weights give t_i = 1/i."""
    if ts is None:
        w = [1.0] * len(models) if weights is None else [float(x) for x in weights]
        ts = [w[i] / sum(w[: i + 1]) if sum(w[: i + 1]) else 0.0 for i in range(1, len(models))]
    acc = np.asarray(models[0], np.float64)
    for m, t in zip(models[1:], ts):
        acc = ref_slerp(acc, m, t)
    return acc
