"""experiments/bench_merge_ops: its NumPy versions compute what the operators compute (so the
ratios compare like with like), and a small run yields a row per operator with the targets."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpift_jax import masks, merges
from cpift_jax.merges import dare
from experiments import bench_merge_ops as bench

# Keys in sorted order: jax flattens dicts by sorted key, and DARE's streams follow leaf order.
SHAPES = {"embed": (96, 32), "norm": (32,), "q": (32, 32), "up": (80, 32)}


def _models(seed=0):
    rng = np.random.default_rng(seed)
    base = {k: rng.standard_normal(s, np.float32) * np.float32(0.02) for k, s in SHAPES.items()}
    tuned = [{k: v + rng.standard_normal(v.shape, np.float32) * np.float32(2e-3)
              for k, v in base.items()} for _ in range(2)]
    return base, tuned


def _hash_keep(seed):
    """DARE's documented draw, re-derived in NumPy: u = mix(mix(index + k0) ^ k1) / 2^32."""
    keys = np.asarray(dare.stream_keys(seed, 2, len(SHAPES)))

    def mix(x):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))

    def keep(i, j, shape, drop_rate):
        index = np.arange(math.prod(shape), dtype=np.uint32).reshape(shape)
        bits = mix(mix(index + keys[i, j, 0]) ^ keys[i, j, 1])
        return (bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24) >= drop_rate

    return keep


@pytest.mark.parametrize("name", sorted(bench.NUMPY))
def test_numpy_versions_agree_with_the_operators(name):
    base_np, models_np = _models()
    base, models = jax.tree.map(jnp.asarray, (base_np, models_np))
    ours = bench.ours(name, base, models)(None)
    if name == "dare":
        expected = bench.np_dare(base_np, models_np, keep=_hash_keep(0))
    else:
        expected = bench.NUMPY[name](base_np, models_np)
    assert set(ours) == set(expected)
    for k in SHAPES:
        if name == "core_mask":
            np.testing.assert_array_equal(np.asarray(ours[k]), expected[k], err_msg=k)
        else:
            np.testing.assert_allclose(np.asarray(ours[k]), expected[k], rtol=1e-5, atol=1e-7,
                                       err_msg=f"{name} leaf {k}")


def test_numpy_dare_draws_keep_at_the_rate():
    base, models = _models()
    out = bench.np_dare(base, models, drop_rate=0.75)
    kept = np.concatenate([(out[k] != base[k]).ravel() for k in base])
    assert abs(kept.mean() - (1 - 0.75 ** 2)) < 0.03  # an entry stays at base if both dropped


def test_counts_follow_the_operators_rule():
    assert bench.top_count(0.29, 100) == masks.core_count(0.29, 100) == 29
    assert bench.top_count(0.2, 7) == masks.core_count(0.2, 7) == 1


def test_verdicts_compare_the_ratio_with_the_target():
    row = {"operator": "slerp", "ours": 1.0, "numpy": 5.0, "mergekit": 2.0}
    assert bench.verdicts(row) == [("numpy >= 4x", True), ("mergekit >= 3x", False)]
    assert bench.verdicts({"operator": "ties", "ours": 1.0}) == [("mergekit >= 2x", None)]
    assert bench.verdicts({"operator": "karcher", "ours": 1.0}) == []


@pytest.mark.slow
def test_a_small_run_times_every_operator_without_mergekit():
    rows = bench.measure(4e6, repeats=1, with_mergekit=False)
    assert [r["operator"] for r in rows] == merges.available() + ["core_mask"]
    by_name = {r["operator"]: r for r in rows}
    assert all(r["ours"] > 0 for r in rows)
    assert set(bench.NUMPY) == {n for n, r in by_name.items() if "numpy" in r}
    assert not any("mergekit" in r for r in rows)
    for name in ("slerp", "ties", "dare", "task_arithmetic", "linear"):
        assert by_name[name]["donated"] > 0, name
