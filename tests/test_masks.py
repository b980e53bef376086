"""Tests for cpift_jax.masks and cpift_jax.select: thresholds, core masks, overlap, storage."""

import dataclasses
import functools
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, PartitionSpec as P

from cpift_jax import masks, select, select_host, tree

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _ref_threshold(leaves, k):
    """k-th largest by a float64 sort: the reference the counting passes must match."""
    flat = np.concatenate([np.asarray(x).astype(np.float32).reshape(-1) for x in leaves])
    return np.sort(flat.astype(np.float64))[::-1][k - 1]


# Host passes small enough that inputs of a few dozen entries go through sample + chunked
# passes, split over up to three threads (runs of whole chunks, so of uneven sizes).
TINY = select.HostPasses(small=16, sample=8, chunk=24, threads=3, thread_min_entries=20)


# Values with many duplicates, zeros, -0.0, subnormals and very large entries.
_VALUES = st.sampled_from(
    [0.0, -0.0, 1e-45, 3e-42, 1e-38, 0.5, 1.0, 1.0, 2.0, 3.5, 1e20, 3.4e38, np.inf]
) | st.floats(0, 10, width=32)


def _score_leaves(min_size=1, max_size=60):
    arrays = hnp.arrays(np.float32, st.integers(0, max_size), elements=_VALUES)
    return st.lists(arrays, min_size=1, max_size=3).filter(
        lambda ls: sum(a.size for a in ls) >= min_size
    )


# ----------------------------------------------------------------------------------- threshold


@pytest.mark.slow
def test_threshold_literal():
    scores = {"a": np.array([[1.0, 5.0], [3.0, 3.0]], np.float32), "b": np.array([7.0, 0.0])}
    # All values, largest first: 7 5 3 3 1 0 (b is float64, compared in float32).
    expected = {1: 7.0, 2: 5.0, 3: 3.0, 4: 3.0, 5: 1.0, 6: 0.0}
    for method in ("host", "xla"):
        for k, v in expected.items():
            out = masks.threshold(scores, k, method=method)
            assert out.dtype == jnp.float32 and float(out) == v, (method, k)


@SETTINGS
@given(leaves=_score_leaves(), data=st.data())
def test_threshold_matches_sort_host(leaves, data):
    total = sum(a.size for a in leaves)
    k = data.draw(st.integers(1, total))
    ref = _ref_threshold(leaves, k)
    assert float(masks.threshold(leaves, k, method="host", host_passes=TINY)) == ref
    assert float(masks.threshold(leaves, k, method="host")) == ref


@pytest.mark.slow  # each example size compiles its own xla program
@settings(max_examples=12, deadline=None)
@given(
    leaf=hnp.arrays(np.float32, st.sampled_from([1, 5, 40]), elements=_VALUES),
    k_frac=st.floats(0, 1),
)
def test_threshold_matches_sort_xla(leaf, k_frac):
    k = 1 + int(k_frac * (leaf.size - 1))
    assert float(masks.threshold([jnp.asarray(leaf)], k, method="xla")) == _ref_threshold([leaf], k)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float64])
def test_threshold_low_and_high_precision_inputs_compare_in_float32(dtype):
    x = np.abs(np.random.default_rng(0).standard_normal(300)) * 1e-3
    leaves = [x.astype(dtype)]
    for k in (1, 7, 150, 300):
        ref = _ref_threshold(leaves, k)
        assert float(masks.threshold(leaves, k, method="host")) == ref
        assert float(masks.threshold([jnp.asarray(leaves[0])], k, method="xla")) == ref


@pytest.mark.slow  # a few million scores through both back ends
def test_threshold_large_input_uses_sampled_pass_and_xla_chunks():
    # Sizes above the real _SMALL and _CHUNK, leaves not multiples of any chunk, with ties.
    rng = np.random.default_rng(1)
    a = np.round(np.abs(rng.standard_normal(70_001)) * 50).astype(np.float32) / 50
    b = np.abs(rng.standard_normal((3, 30_011))).astype(ml_dtypes.bfloat16)
    leaves = [a, b]
    xla_leaves = [jnp.asarray(a), jnp.asarray(b)]
    for k in (1, 1_000, 40_000, 100_000, 160_034):
        ref = _ref_threshold(leaves, k)
        assert float(masks.threshold(leaves, k, method="host")) == ref, k
        assert float(masks.threshold(xla_leaves, k, method="xla")) == ref, k


# Adversarial inputs for the host path's sample: N entries with sample target 200 make the
# sample every 211th entry in flatten order (211 = N // 200 is prime), so giving the sampled
# entries other values than the rest misleads the first bracket in a chosen way.
_N, _STRIDE = 42_200, 211
_PASSES = select.HostPasses(chunk=1000, small=16, sample=200, threads=1)


def _misleading_leaves(kind: str) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    sampled = np.zeros(_N, bool)
    sampled[::_STRIDE] = True
    s = int(sampled.sum())
    x = np.empty(_N, np.float32)
    spread = rng.permutation(s) / s  # distinct values in [0, 1)
    x[~sampled], x[sampled] = {
        "sample_high": (rng.random(_N - s), 2 + spread),  # sample above everything else
        "sample_low": (1 + rng.random(_N - s), spread / 2),  # sample below everything else
        "sample_spread": (0.5 + (rng.random(_N - s) - 0.5) / 50, spread),  # the rest in a band
        "sample_tied": (rng.random(_N - s), 0.5),  # one value: the first bracket is one wide
        "rest_tied": (np.round(rng.random(_N - s) * 4) / 4, 2 + spread),  # five values
    }[kind]
    return [x[:20_000], x[20_000:].reshape(100, 222)]


def _misses_below(k, found):  # count(>= lo) < k
    return found.passes[0].counts[0] < k


def _misses_above(k, found):  # count(>= hi) >= k
    first = found.passes[0]
    return first.bracket[1] is not None and first.counts[1] >= k


def _copy_over_cap_in_a_run(k, found):  # the bracket held, but one run's copy went over cap
    first = found.passes[0]
    return first.counts[0] >= k > first.counts[1] and first.run_copies == (None,)


def _copy_over_cap_in_total(k, found):  # each of three runs' copies fit, together they do not
    first = found.passes[0]
    return (len(first.run_copies) == 3 and None not in first.run_copies
            and sum(first.run_copies) > first.cap and first.copied is None)


def _bisects(k, found):  # a bracket over extract_max: 16-way cuts, counting only
    return any(p.bracket is None and len(p.cuts) == 15 for p in found.passes[1:])


def _counts_alone_decide(k, found):  # ties: bisection down to one pattern, nothing copied
    return _bisects(k, found) and found.passes[-1].bracket is None and found.equal > 5


def _one_value_bracket(k, found):  # the sample's bracket is one pattern wide: counts only
    first = found.passes[0]
    return first.bracket is None and len(first.cuts) == 2 and first.cuts[1] - first.cuts[0] == 1


@pytest.mark.parametrize(
    "kind, k, passes, check",
    [
        ("sample_high", _N // 4, _PASSES, _misses_below),
        ("sample_high", 100, _PASSES, _misses_below),  # one-sided bracket (k <= N / 64)
        ("sample_low", _N // 4, _PASSES, _misses_above),
        ("sample_spread", _N // 2, _PASSES, _copy_over_cap_in_a_run),
        ("sample_spread", _N // 2, dataclasses.replace(_PASSES, threads=3, thread_min_entries=1),
         _copy_over_cap_in_total),
        ("sample_high", _N // 2, dataclasses.replace(_PASSES, extract_max=1000), _bisects),
        ("rest_tied", _N // 2, dataclasses.replace(_PASSES, extract_max=5), _counts_alone_decide),
        ("sample_tied", _N // 2, _PASSES, _one_value_bracket),
    ],
)
def test_threshold_recovers_from_a_misleading_sample(kind, k, passes, check):
    """A sample chosen to mislead costs passes, never exactness: the passes taken show the
    recovery path, and the value equals a sort's."""
    leaves = _misleading_leaves(kind)
    found = select_host.kth_largest([(x.reshape(-1),) for x in leaves], k, passes=passes)
    assert check(k, found), found.passes
    assert np.uint32(found.bits).view(np.float32) == _ref_threshold(leaves, k)
    assert found.above < k <= found.above + found.equal
    for k in (1, 13, k, _N - 1, _N):
        got = masks.threshold(leaves, k, method="host", host_passes=passes)
        assert float(got) == _ref_threshold(leaves, k), k


def test_host_passes_are_checked():
    with pytest.raises(ValueError, match="HostPasses: chunk must be a positive int, got 0"):
        select.HostPasses(chunk=0)
    with pytest.raises(ValueError, match="HostPasses: threads must be a positive int"):
        select.HostPasses(threads=True)
    with pytest.raises(ValueError, match="threshold: host_passes must be a select.HostPasses"):
        masks.threshold([np.ones(3)], 1, host_passes={"chunk": 8})


@pytest.mark.parametrize("method", ["host", "xla"])
def test_threshold_negative_zero_counts_as_zero(method):
    leaves = [np.array([-0.0, 0.0, 2.0, -0.0], np.float32)]
    assert float(masks.threshold(leaves, 1, method=method)) == 2.0
    out = masks.threshold(leaves, 3, method=method)
    assert float(out) == 0.0 and not np.signbit(float(out))


@pytest.mark.parametrize("bad", [np.nan, -1.0, -np.inf])
def test_threshold_rejects_nan_and_negative_on_host(bad):
    x = np.ones(50, np.float32)
    x[31] = bad
    with pytest.raises(ValueError, match="leaf 'w'.*NaN or negative"):
        masks.threshold({"w": x, "v": np.ones(3, np.float32)}, 5, method="host", host_passes=TINY)


def test_threshold_nan_gives_nan_on_xla_path():
    x = jnp.array([1.0, jnp.nan, 2.0])
    assert np.isnan(float(masks.threshold([x], 1, method="xla")))
    assert np.isnan(float(jax.jit(masks.threshold, static_argnums=1)([x], 2)))


def test_threshold_is_jittable_and_auto_picks_xla_under_jit():
    x = jnp.array([[3.0, 1.0], [2.0, 2.0]])
    f = jax.jit(functools.partial(masks.threshold, k=3))
    assert float(f({"x": x})) == 2.0


def test_threshold_psum_over_a_sharded_axis():
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    x = np.abs(np.random.default_rng(3).standard_normal((8, 50))).astype(np.float32)
    x[:, ::5] = 1.0  # ties across shards
    run = jax.jit(
        jax.shard_map(
            lambda s: masks.threshold([s], 123, axis_name="d"),
            mesh=mesh,
            in_specs=P("d"),
            out_specs=P(),
            check_vma=False,
        )
    )
    assert float(run(x)) == _ref_threshold([x], 123)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scores=[np.ones(3)], k=0), r"k must be in \[1, 3\]"),
        (dict(scores=[np.ones(3)], k=4), r"k must be in \[1, 3\]"),
        (dict(scores=[np.ones(3)], k=True), "k must be a Python int"),
        (dict(scores=[np.ones(3)], k=1.0), "k must be a Python int"),
        (dict(scores={"a": {"w": np.ones(3, np.int32)}}, k=1), "leaf 'a/w'.*expected float"),
        (dict(scores={}, k=1), "no leaves"),
        (dict(scores=[np.ones(3)], k=1, method="sort"), "method must be one of"),
    ],
)
def test_threshold_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        masks.threshold(**kwargs)


# ----------------------------------------------------------------------------------- core_mask


def _two_leaves():
    base = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
    # |delta| a = [[1, 5, 2], [0, 3, 3]], b = [3, 7, 0, 1]: D = 10.
    tuned = {"a": jnp.array([[1.0, -5, 2], [0, 3, -3]]), "b": jnp.array([3.0, 7, 0, -1])}
    return base, tuned


def _as_np(tree):
    return jax.tree.map(np.asarray, tree)


def test_core_mask_global_literal():
    base, tuned = _two_leaves()
    m = _as_np(masks.core_mask(base, tuned, 0.25))  # k = 2: the 7 and the 5
    np.testing.assert_array_equal(m["a"], [[0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(m["b"], [0, 1, 0, 0])
    m = _as_np(masks.core_mask(base, tuned, 0.4))  # k = 4: 7, 5 and two of the three 3s
    np.testing.assert_array_equal(m["a"], [[0, 1, 0], [0, 1, 1]])
    np.testing.assert_array_equal(m["b"], [0, 1, 0, 0])


def test_core_mask_leaf_scope_literal():
    base, tuned = _two_leaves()
    m = _as_np(masks.core_mask(base, tuned, 0.5, scope="leaf"))  # k_a = 3, k_b = 2
    np.testing.assert_array_equal(m["a"], [[0, 1, 0], [0, 1, 1]])
    np.testing.assert_array_equal(m["b"], [1, 1, 0, 0])


def test_core_mask_all_equal_deltas_takes_the_earliest_entries():
    base = {"x": jnp.zeros((2, 2)), "y": jnp.zeros(3), "z": jnp.zeros(3)}
    tuned = jax.tree.map(lambda b: b + 0.5, base)
    m = _as_np(masks.core_mask(base, tuned, 0.5))  # D = 10, k = 5: x (4 entries), then y[0]
    np.testing.assert_array_equal(m["x"], [[1, 1], [1, 1]])
    np.testing.assert_array_equal(m["y"], [1, 0, 0])
    np.testing.assert_array_equal(m["z"], [0, 0, 0])


def test_core_mask_leaf_scope_ties_take_the_earliest_entries_of_each_leaf():
    base = {"p": jnp.zeros(4), "q": jnp.zeros((2, 2))}
    tuned = {"p": jnp.array([1.0, 3.0, 1.0, 1.0]), "q": jnp.array([[2.0, 2.0], [2.0, 2.0]])}
    # scope="leaf", k = floor(0.5 * 4) = 2 per leaf: p takes the 3 then the first tied 1;
    # q (all tied) takes its first two entries in row-major order.
    m = _as_np(masks.core_mask(base, tuned, 0.5, scope="leaf"))
    np.testing.assert_array_equal(m["p"], [1, 1, 0, 0])
    np.testing.assert_array_equal(m["q"], [[1, 1], [0, 0]])


def test_core_mask_ties_cut_inside_a_later_leaf():
    base = {"p": jnp.zeros(3), "q": jnp.zeros((2, 3))}
    tuned = {"p": jnp.array([9.0, 1.0, 2.0]), "q": jnp.array([[2.0, 0.0, 2.0], [2.0, 5.0, 2.0]])}
    # k = floor(0.5 * 9) = 4: the 9 and the 5, then two of the five 2s: p[2], then q[0, 0].
    m = _as_np(masks.core_mask(base, tuned, 0.5))
    np.testing.assert_array_equal(m["p"], [1, 0, 1])
    np.testing.assert_array_equal(m["q"], [[1, 0, 0], [0, 1, 0]])


def test_core_mask_zero_count_is_all_false_and_one_is_all_true():
    base, tuned = _two_leaves()
    m = masks.core_mask(base, tuned, 0.05)  # floor(0.5) = 0
    assert not any(bool(x.any()) for x in jax.tree.leaves(m))
    m = masks.core_mask(base, tuned, 1.0)
    assert all(bool(x.all()) for x in jax.tree.leaves(m))
    assert masks.core_count(0.29, 100) == 29  # 0.29 * 100 is 28.999999999999996 in floats


def test_core_mask_include_exclude():
    base = {"embed": jnp.zeros(4), "layers": [{"w": jnp.zeros(4)}, {"w": jnp.zeros(4)}]}
    tuned = {
        "embed": jnp.array([100.0, 100, 100, 100]),
        "layers": [{"w": jnp.array([1.0, 2, 3, 4])}, {"w": jnp.array([8.0, 7, 6, 5])}],
    }
    m = _as_np(masks.core_mask(base, tuned, 0.25, exclude="embed"))  # D = 8, k = 2
    np.testing.assert_array_equal(m["embed"], [0, 0, 0, 0])
    np.testing.assert_array_equal(m["layers"][0]["w"], [0, 0, 0, 0])
    np.testing.assert_array_equal(m["layers"][1]["w"], [1, 1, 0, 0])
    m = _as_np(masks.core_mask(base, tuned, 0.5, include=[r"layers/0/", r"embed"], exclude="emb"))
    np.testing.assert_array_equal(m["layers"][0]["w"], [0, 0, 1, 1])  # D = 4, k = 2
    assert not m["embed"].any() and not m["layers"][1]["w"].any()


def test_core_mask_bf16_params_and_jit_agree():
    rng = np.random.default_rng(4)
    base = {"w": jnp.asarray(rng.standard_normal((6, 7)), jnp.bfloat16), "v": jnp.zeros(5, jnp.bfloat16)}
    tuned = jax.tree.map(lambda x: (x + jnp.round(jnp.asarray(rng.standard_normal(x.shape)) * 2) / 4).astype(x.dtype), base)
    eager = masks.core_mask(base, tuned, 0.3)
    jitted = jax.jit(lambda b, t: masks.core_mask(b, t, 0.3))(base, tuned)
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(x, y)
    assert masks.density(eager)["count"] == math.floor(0.3 * 47)


def test_core_mask_works_on_nnx_state():
    class Tiny(nnx.Module):
        def __init__(self, seed):
            self.layers = nnx.List([nnx.Linear(3, 4, rngs=nnx.Rngs(seed)) for _ in range(2)])

    base, tuned = nnx.state(Tiny(0), nnx.Param), nnx.state(Tiny(1), nnx.Param)
    m = masks.core_mask(base, tuned, 0.25, exclude="bias")
    assert isinstance(m, nnx.State)
    masks.check_mask(base, m)
    d = masks.density(m)
    assert d["count"] == 6 and set(d["per_leaf"]) == {
        "layers/0/bias", "layers/0/kernel", "layers/1/bias", "layers/1/kernel"
    }
    assert d["per_leaf"]["layers/0/bias"] == 0.0
    restored = masks.unpack(masks.pack(m), base)
    assert isinstance(restored, nnx.State)
    assert masks.jaccard(m, jax.tree.map(jnp.asarray, restored)) == 1.0
    by_layer = masks.density_by_group(m, tree.layer_index)
    assert list(by_layer) == [0, 1] and sum(g["count"] for g in by_layer.values()) == 6


def _flat_deltas_strategy():
    small = st.sampled_from([0.0, 1e-45, 1e-40, 0.25, 0.25, 1.0, 2.0, 3.0])
    leaf = hnp.arrays(np.float32, st.sampled_from([(3,), (2, 2), (5,)]), elements=small)
    return st.lists(leaf, min_size=1, max_size=3)


@SETTINGS
@given(deltas=_flat_deltas_strategy(), fraction=st.floats(0.01, 1.0))
def test_core_mask_properties(deltas, fraction):
    base = {f"l{i}": np.zeros_like(d) for i, d in enumerate(deltas)}
    tuned = {f"l{i}": d for i, d in enumerate(deltas)}
    m = masks.core_mask(base, tuned, fraction)
    flat_m = np.concatenate([np.asarray(m[f"l{i}"]).reshape(-1) for i in range(len(deltas))])
    flat_d = np.concatenate([d.reshape(-1) for d in deltas]).astype(np.float64)
    # Deltas are taken by XLA, which flushes float32 subnormals to zero on CPU.
    flat_d[flat_d < np.finfo(np.float32).tiny] = 0.0
    k = masks.core_count(fraction, flat_d.size)
    assert flat_m.sum() == k
    if 0 < k < flat_d.size:
        assert flat_d[flat_m].min() >= flat_d[~flat_m].max()
        v = flat_d[flat_m].min()
        tied = np.flatnonzero(flat_d == v)
        taken = flat_m[tied]
        assert not np.any(taken[1:] & ~taken[:-1]), "ties must be taken earliest first"


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((0.0,), {}, r"fraction must be in \(0, 1\]"),
        ((1.5,), {}, r"fraction must be in \(0, 1\]"),
        ((-0.1,), {}, r"fraction must be in \(0, 1\]"),
        ((float("nan"),), {}, r"fraction must be in \(0, 1\]"),
        ((float("inf"),), {}, r"fraction must be in \(0, 1\]"),
        ((1.0000001,), {}, r"fraction must be in \(0, 1\]"),
        ((True,), {}, "fraction must be a number"),
        (("0.1",), {}, "fraction must be a number"),
        ((0.5, "layer"), {}, "scope must be one of"),
        ((0.5,), dict(include="nothing"), "leave no eligible leaf"),
        ((0.5,), dict(exclude=["a", "b"]), "leave no eligible leaf"),
        ((0.5,), dict(include="(unclosed"), "invalid include regex"),
    ],
)
def test_core_mask_argument_errors(args, kwargs, match):
    base, tuned = _two_leaves()
    with pytest.raises(ValueError, match=match):
        masks.core_mask(base, tuned, *args, **kwargs)


def test_core_mask_structure_errors_name_the_leaf():
    base, tuned = _two_leaves()
    with pytest.raises(ValueError, match="leaf 'b' is in base but missing from tuned"):
        masks.core_mask(base, {"a": tuned["a"]}, 0.5)
    with pytest.raises(ValueError, match="leaf 'c' is in tuned but missing from base"):
        masks.core_mask(base, dict(tuned, c=jnp.zeros(2)), 0.5)
    with pytest.raises(ValueError, match="leaf 'b': base has shape"):
        masks.core_mask(base, {"a": tuned["a"], "b": jnp.zeros(5)}, 0.5)
    with pytest.raises(ValueError, match="leaf 'b': base has dtype float32, tuned has dtype bfloat16"):
        masks.core_mask(base, {"a": tuned["a"], "b": tuned["b"].astype(jnp.bfloat16)}, 0.5)
    ints = {"a": jnp.zeros(2, jnp.int32)}
    with pytest.raises(ValueError, match="leaf 'a' has dtype int32, expected float"):
        masks.core_mask(ints, ints, 0.5)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_core_mask_non_finite_delta_names_the_leaf(bad):
    base, tuned = _two_leaves()
    tuned = {"a": tuned["a"], "b": tuned["b"].at[2].set(bad)}
    with pytest.raises(ValueError, match="leaf 'b'.*NaN or Inf"):
        masks.core_mask(base, tuned, 0.5)


def test_core_mask_under_jit_nan_delta_selects_nothing():
    base, tuned = _two_leaves()
    tuned = {"a": tuned["a"], "b": tuned["b"].at[2].set(jnp.nan)}
    m = jax.jit(lambda b, t: masks.core_mask(b, t, 0.5))(base, tuned)
    assert not any(bool(x.any()) for x in jax.tree.leaves(m))


# ------------------------------------------------------------------- overlap, density, storage


def test_jaccard_literal():
    a = {"x": np.array([True, True, False]), "y": np.array([[False]])}
    b = {"x": np.array([False, True, True]), "y": np.array([[False]])}
    assert masks.jaccard(a, b) == pytest.approx(1 / 3)
    empty = jax.tree.map(np.zeros_like, a)
    assert masks.jaccard(empty, empty) == 1.0
    assert masks.jaccard(a, empty) == 0.0


def test_jaccard_errors_name_the_leaf():
    a = {"x": np.ones(3, bool), "y": np.ones(2, bool)}
    with pytest.raises(ValueError, match="leaf 'y': mask_a has shape"):
        masks.jaccard(a, {"x": np.ones(3, bool), "y": np.ones(3, bool)})
    with pytest.raises(ValueError, match="leaf 'x': mask_b has dtype float32, expected bool"):
        masks.jaccard(a, {"x": np.ones(3, np.float32), "y": np.ones(2, bool)})


_MASKS = st.lists(
    st.tuples(hnp.arrays(bool, (13,)), hnp.arrays(bool, (2, 35))), min_size=1, max_size=4
)


@SETTINGS
@given(ms=_MASKS)
def test_overlap_matrix_is_pairwise_jaccard(ms):
    trees = [{"u": u, "v": v} for u, v in ms]
    mat = masks.overlap_matrix(trees)
    assert mat.shape == (len(trees),) * 2 and mat.dtype == np.float64
    np.testing.assert_array_equal(mat, mat.T)
    np.testing.assert_array_equal(np.diag(mat), 1.0)
    assert ((0 <= mat) & (mat <= 1)).all()
    for i, a in enumerate(trees):
        for j, b in enumerate(trees):
            assert mat[i, j] == pytest.approx(masks.jaccard(a, b), abs=1e-15)
            assert masks.jaccard(a, b) == masks.jaccard(b, a)


def test_overlap_matrix_literal_and_errors():
    a = {"w": np.array([1, 1, 0, 0], bool)}
    b = {"w": np.array([0, 1, 1, 0], bool)}
    c = {"w": np.zeros(4, bool)}
    np.testing.assert_allclose(
        masks.overlap_matrix([a, b, c]), [[1, 1 / 3, 0], [1 / 3, 1, 0], [0, 0, 1]]
    )
    with pytest.raises(ValueError, match="at least one mask"):
        masks.overlap_matrix([])
    with pytest.raises(ValueError, match="leaf 'w': masks\\[0\\] has shape"):
        masks.overlap_matrix([a, {"w": np.zeros(5, bool)}])


def test_density_literal_and_groups():
    m = {
        "embed": np.array([True, False, False, False]),
        "layers": [{"mlp": np.ones((2, 2), bool)}, {"mlp": np.zeros((2, 2), bool)}],
    }
    d = masks.density(m)
    assert d == {
        "per_leaf": {"embed": 0.25, "layers/0/mlp": 1.0, "layers/1/mlp": 0.0},
        "total": 5 / 12,
        "count": 5,
    }
    by_layer = masks.density_by_group(m, tree.layer_index)
    assert by_layer == {
        None: {"count": 1, "size": 4, "density": 0.25},
        0: {"count": 4, "size": 4, "density": 1.0},
        1: {"count": 0, "size": 4, "density": 0.0},
    }
    by_kind = masks.density_by(m, [(r".*mlp", "mlp"), (r".*", "other")])
    assert by_kind["mlp"] == {"count": 4, "size": 8, "density": 0.5}
    with pytest.raises(ValueError, match="leaf 'embed' matches no rule"):
        masks.density_by(m, [(r".*mlp", "mlp")])


def test_pack_literal_bytes():
    m = {"w": np.array([[True, False, True], [True, True, True], [False, False, True]])}
    packed = masks.pack(m)
    assert packed["w"].dtype == np.uint8
    np.testing.assert_array_equal(packed["w"], [0b10111100, 0b10000000])


@SETTINGS
@given(shapes=st.lists(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9), max_size=3), data=st.data())
def test_pack_unpack_round_trip(shapes, data):
    m = {f"m{i}": data.draw(hnp.arrays(bool, s)) for i, s in enumerate(shapes)}
    like = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32) for k, v in m.items()}
    out = masks.unpack(masks.pack(m), like)
    assert set(out) == set(m)
    for k in m:
        assert out[k].dtype == np.bool_ and out[k].shape == m[k].shape
        np.testing.assert_array_equal(out[k], m[k])


def test_unpack_errors_name_the_leaf():
    m = {"a": np.ones(10, bool), "b": np.ones(3, bool)}
    packed = masks.pack(m)
    with pytest.raises(ValueError, match="leaf 'a': expected 3 packed uint8 bytes for shape"):
        masks.unpack(packed, {"a": np.zeros(17), "b": np.zeros(3)})
    with pytest.raises(ValueError, match="leaf 'c' is only in like"):
        masks.unpack(packed, {"a": np.zeros(10), "b": np.zeros(3), "c": np.zeros(1)})
    with pytest.raises(ValueError, match="leaf 'b' is only in packed"):
        masks.unpack(packed, {"a": np.zeros(10)})
    with pytest.raises(ValueError, match="leaf 'b': expected 1 packed uint8"):
        masks.unpack({"a": packed["a"], "b": packed["b"].astype(np.int32)}, m)
    with pytest.raises(ValueError, match="leaf 'a': mask has dtype float64, expected bool"):
        masks.pack({"a": np.zeros(3)})


def test_check_mask():
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    masks.check_mask(params, {"w": np.ones((2, 3), bool), "b": jnp.zeros(3, bool)})
    with pytest.raises(ValueError, match="leaf 'w': params has shape"):
        masks.check_mask(params, {"w": np.ones((3, 2), bool), "b": np.ones(3, bool)})
    with pytest.raises(ValueError, match="leaf 'b': mask has dtype float32, expected bool"):
        masks.check_mask(params, {"w": np.ones((2, 3), bool), "b": jnp.ones(3)})
    with pytest.raises(ValueError, match="leaf 'b' is in params but missing from mask"):
        masks.check_mask(params, {"w": np.ones((2, 3), bool)})


def test_threshold_with_an_empty_leaf_on_the_host_path():
    # Found by hypothesis: an empty leaf beside a -0.0 one used to fail in a max() reduction.
    scores = {"a": np.zeros((0,), np.float32), "b": np.array([-0.0, 2.0, 1.0], np.float32)}
    assert float(masks.threshold(scores, 2, method="host")) == 1.0


# ------------------------------------------------------------------------ count rule and top_k


def test_count_for_fraction_is_the_one_rule():
    assert masks.core_count is select.count_for_fraction
    assert [select.count_for_fraction(f, 100) for f in (0.29, 0.2, 0.005, 1.0)] == [29, 20, 0, 100]
    assert select.count_for_fraction(0.5, 7) == 3  # floor, not round
    assert select.count_for_fraction(0.1, 30) == 3  # 0.1 * 30 is 3.0000000000000004 in floats


def _stable_top(scores, k):
    """Exactly k largest, ties earliest first (leaf order, then row-major), by a stable sort."""
    flat = np.concatenate([s.reshape(-1) for s in scores]).astype(np.float64)
    chosen = np.zeros(flat.size, bool)
    chosen[np.argsort(-flat, kind="stable")[:k]] = True
    return np.split(chosen, np.cumsum([s.size for s in scores])[:-1])


@pytest.mark.parametrize("k", [0, 1, 7, 40, 63, 119, 120])
def test_top_k_of_pairs_cuts_ties_earliest_first(k):
    """Many ties spread over leaves: the host form (threshold + last tie index per leaf, the
    differences never materialised) selects the same entries as a stable sort."""
    rng = np.random.default_rng(7)
    bases = [rng.standard_normal(s).astype(np.float32) for s in ((5, 8), (40,), (4, 10))]
    tuned = [b + np.round(rng.standard_normal(b.shape) * 2).astype(np.float32) / 4 for b in bases]
    top = select.top_k(list(zip(bases, tuned)), k, host_passes=TINY)
    assert top.masks is None
    scores = [np.abs(t - b) for b, t in zip(bases, tuned)]
    for j, (score, expected) in enumerate(zip(scores, _stable_top(scores, k))):
        got = np.asarray(top.leaf_mask(j, jnp.asarray(score))).reshape(-1)
        np.testing.assert_array_equal(got, expected, err_msg=f"leaf {j}")
    traced = jax.jit(lambda pairs: select.top_k(pairs, k).masks if k else [])(
        list(zip(bases, tuned)))
    for got, expected in zip(traced, _stable_top(scores, k)):
        np.testing.assert_array_equal(np.asarray(got).reshape(-1), expected)
