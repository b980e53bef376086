"""Exact counting beyond int32 and sharded core masks (cpift_jax.select_xla under shard_map).

Eight faked CPU devices come from conftest. Every shard_map here runs with the default
check_vma=True.
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cpift_jax import masks, select, select_xla

BF16 = ml_dtypes.bfloat16


def _ref_threshold(leaves, k):
    flat = np.concatenate([np.asarray(x).astype(np.float32).reshape(-1) for x in leaves])
    return np.sort(flat.astype(np.float64))[::-1][k - 1]


def _mesh(shape):
    return Mesh(np.array(jax.devices()[:8]).reshape(shape), ("x", "y"))


def _limbs(counts):
    counts = [int(c) for c in counts]
    return select_xla.Count(jnp.asarray(np.array([c >> 16 for c in counts], np.uint32)),
                            jnp.asarray(np.array([c & 0xFFFF for c in counts], np.uint32)))


def _value(count):
    return int(count.hi) * 65536 + int(count.lo)


def _ref_pick(counts, k):
    """Largest d with sum(counts[d:]) >= k, and k - sum(counts[d + 1:]), in Python ints."""
    above = 0
    for d in range(len(counts) - 1, -1, -1):
        if above + counts[d] >= k:
            return d, k - above
        above += counts[d]
    raise AssertionError("k above the total")


# ------------------------------------------------------------------------- counts past 2^31


def test_pick_digit_is_exact_for_counts_and_ranks_past_int32():
    rng = np.random.default_rng(0)
    counts = [0] * 65536
    for d in rng.choice(65536, 40, replace=False):
        counts[int(d)] = int(rng.integers(1, 2**38))  # a bin alone may pass 2^32
    counts[0xFFFE] = 2**32 + 7
    counts[5] = 2**31 - 1  # one below the int32 limit, on a limb boundary's far side
    total = sum(counts)
    assert 2**40 < total < 2**47
    pick = jax.jit(select_xla.pick_digit)
    hist = _limbs(counts)
    suffix = np.cumsum(np.array(counts[::-1], dtype=object))[::-1]
    ks = [1, 2**31, 2**31 + 1, 2**32 + 7, 2**32 + 8, total, total - 1,
          int(suffix[6]), int(suffix[6]) + 1, int(suffix[0xFFFE])]
    ks += [int(k) for k in rng.integers(2**31, total, 20)]
    for k in ks:
        digit, rank = pick(hist, select_xla.count_const(k))
        assert (int(digit), _value(rank)) == _ref_pick(counts, k), k


def test_count_arithmetic_carries_and_borrows():
    for a, b in [(2**31 + 65535, 1), (2**40, 2**40 - 1), (65536, 65535), (2**33 + 3, 2**32 + 70000)]:
        ca, cb = select_xla.count_const(a), select_xla.count_const(b)
        assert _value(select_xla.count_add(ca, cb)) == a + b
        assert _value(select_xla.count_sub(ca, cb)) == a - b
        assert bool(select_xla.count_ge(ca, cb)) and not bool(select_xla.count_ge(cb, ca))


def test_psum_of_per_shard_int32_counts_does_not_overflow():
    """Eight shards each counting 2^31 - 1 in int32: the sum (about 2^34) is exact."""
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    per_shard = np.array([2**31 - 1, 2**31 - 2, 0, 1, 65535, 65536, 2**30, 2**31 - 65536],
                         np.int32)
    local = np.stack([np.roll(per_shard, i) for i in range(8)])  # shard i holds row i
    local[:, 0] = 2**31 - 1

    def body(x):
        return select_xla.count_psum(select_xla.count_of(x[0]), ("d",))

    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P()))(local)
    got = [int(h) * 65536 + int(lo) for h, lo in zip(out.hi, out.lo)]
    assert got == [int(s) for s in local.astype(np.int64).sum(0)]
    assert got[0] == 8 * (2**31 - 1)


def test_threshold_lowers_for_more_than_2_pow_31_entries():
    leaves = {f"w{i}": jax.ShapeDtypeStruct((2**15, 2**15), jnp.bfloat16) for i in range(3)}
    k = 2**31 + 12345  # beyond int32 as well
    lowered = jax.jit(functools.partial(select.threshold, k=k)).lower(leaves)
    assert lowered.out_info.shape == () and lowered.out_info.dtype == jnp.float32


def test_per_leaf_core_mask_programs_lower_for_a_leaf_of_more_than_2_pow_31_entries():
    """Every per-leaf pass of the sharded core mask lowers with abstract inputs for one leaf of
    2^31 + 2^18 bfloat16 entries (2^28 per shard on 8 devices)."""
    mesh = _mesh((8, 1))
    spec = P("x", "y")
    shape = (2**16 + 8, 2**15)
    leaf = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, spec))
    assert leaf.size > 2**31

    def scalar(dtype):
        return jax.ShapeDtypeStruct((), dtype, sharding=NamedSharding(mesh, P()))

    count = select_xla.Count(scalar(jnp.uint32), scalar(jnp.uint32))
    scalars = {"high": (), "low": (scalar(jnp.int32),), "counts": (scalar(jnp.float32),),
               "mask": (scalar(jnp.float32), scalar(jnp.bool_)), "cut": (scalar(jnp.float32), count)}
    assert set(scalars) == set(masks._PASSES)
    for name, args in scalars.items():
        program = masks.leaf_program(name, mesh, shape, (leaf.dtype, leaf.dtype), spec)
        lowered = program.lower(leaf, leaf, *args)
        if name in ("mask", "cut"):
            assert lowered.out_info.shape == shape and lowered.out_info.dtype == jnp.bool_


def test_a_leaf_shard_of_2_pow_31_entries_is_refused_by_name():
    leaves = {"big": jax.ShapeDtypeStruct((2**31,), jnp.bfloat16)}
    with pytest.raises(ValueError, match="leaf 'big'.*counts each leaf shard in int32"):
        jax.jit(functools.partial(select.threshold, k=5)).lower(leaves)


# ------------------------------------------------------------------------------ on a mesh


def _scores(rng, shape, dtype=np.float32):
    x = np.abs(rng.standard_normal(shape)).astype(dtype)
    x.reshape(-1)[::7] = 1.0  # ties across shards
    x.reshape(-1)[::11] = 0.0
    return x


SPECS = [P("x"), P("x", "y"), P(("x", "y")), P(None, "y"), P(None, ("y", "x")), P()]


def _axes(spec):
    return select_xla.LeafLayout.from_spec((1, 1), spec).axes


@pytest.mark.parametrize("shape", [pytest.param((8, 1), marks=pytest.mark.slow),
                                   pytest.param((4, 2), marks=pytest.mark.slow),
                                   pytest.param((2, 4), marks=pytest.mark.slow)])
def test_threshold_under_shard_map_equals_one_device(shape):
    mesh = _mesh(shape)
    rng = np.random.default_rng(1)
    leaves = [_scores(rng, (16, 24)) for _ in SPECS]
    axis_name = [_axes(spec) or None for spec in SPECS]
    ks, ks_all = (1, 7, 100, 384), (1, 50, 999, 2304)

    def body(*shards):  # one program: each leaf alone, then all leaves together
        alone = [[select.threshold([s], k, axis_name=axes) for k in ks]
                 for s, axes in zip(shards, axis_name)]
        return alone, [select.threshold(list(shards), k, axis_name=axis_name) for k in ks_all]

    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(SPECS), out_specs=P()))
    alone, together = run(*[jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(leaves, SPECS)])
    bits = lambda values: np.array(values, np.float32).view(np.uint32).tolist()
    for x, got in zip(leaves, alone):
        assert bits(got) == bits([select.threshold([x], k, method="host") for k in ks])
    # Each leaf psum-ed over its own axes: the replicated one counted once.
    assert bits(together) == bits([_ref_threshold(leaves, k) for k in ks_all])


def test_threshold_refuses_axes_that_differ_from_the_leaf_sharding():
    mesh = _mesh((4, 2))
    run = jax.jit(jax.shard_map(lambda s: select.threshold({"w": s}, 3, axis_name=("x", "y")),
                                mesh=mesh, in_specs=P("x"), out_specs=P()))
    with pytest.raises(ValueError, match=r"leaf 'w' is sharded over mesh axes \['x'\]"):
        run(jnp.ones((8, 4)))


@pytest.mark.parametrize("bad", [np.nan, -1.0])
def test_nan_or_negative_score_gives_nan_under_shard_map(bad):
    mesh = _mesh((4, 2))
    x = np.ones((8, 4), np.float32)
    x[5, 3] = bad
    run = jax.jit(jax.shard_map(lambda s: select.threshold([s], 2, axis_name=("x", "y")),
                                mesh=mesh, in_specs=P("x", "y"), out_specs=P()))
    assert np.isnan(float(run(x)))


def _model(rng, dtype):
    shapes = {"embed": (32, 16), "layer/q": (16, 16), "layer/bias": (16,), "norm": (24,),
              "head": (16, 40)}
    base = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    tuned = {k: (v.astype(np.float32) + 0.01 * rng.standard_normal(v.shape)
                 * (rng.random(v.shape) < 0.5)).astype(dtype) for k, v in base.items()}
    return base, tuned


MODEL_SPECS = {"embed": P("x", "y"), "layer/q": P(None, ("x", "y")), "layer/bias": P(),
               "norm": P("x"), "head": P("y", "x")}


def _put(tree, mesh):
    return {k: jax.device_put(v, NamedSharding(mesh, MODEL_SPECS[k])) for k, v in tree.items()}


def _check_core_masks(mesh, base, tuned, fraction, scope="global", **kwargs):
    want = masks.core_mask(base, tuned, fraction, scope, **kwargs)
    sharded_base = _put(base, mesh)
    got = masks.core_mask(sharded_base, _put(tuned, mesh), fraction, scope, **kwargs)
    for key in base:
        assert got[key].sharding == sharded_base[key].sharding, key
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]),
                                      err_msg=f"{key} {fraction} {scope}")
    return got


@pytest.mark.slow  # compiles a sharded program per mesh shape
@pytest.mark.parametrize("shape", [(8, 1), (4, 2), (2, 4)])
def test_core_mask_on_sharded_models_equals_one_device_and_keeps_shardings(shape):
    mesh = _mesh(shape)
    rng = np.random.default_rng(2)
    base, tuned = _model(rng, BF16)  # bfloat16 deltas: many ties at the threshold
    got = _check_core_masks(mesh, base, tuned, 0.3)
    assert sum(int(np.asarray(m).sum()) for m in got.values()) == masks.core_count(
        0.3, sum(v.size for v in base.values()))
    _check_core_masks(mesh, base, tuned, 0.2, exclude="norm|bias")
    base, tuned = _model(rng, np.float32)
    _check_core_masks(mesh, base, tuned, 0.01)


@pytest.mark.slow  # compiles several sharded programs
def test_core_mask_on_sharded_models_per_leaf_and_everything():
    mesh = _mesh((4, 2))
    base, tuned = _model(np.random.default_rng(5), BF16)
    _check_core_masks(mesh, base, tuned, 0.5, "leaf")
    got = _check_core_masks(mesh, base, tuned, 1.0)
    assert all(bool(np.asarray(m).all()) for m in got.values())


def test_core_mask_ties_cut_by_global_row_major_order():
    """All deltas equal: the first k entries of each leaf in global row-major order win,
    whatever dimension the leaf is split on."""
    mesh = _mesh((2, 4))
    base = {"a": np.zeros((8, 8), np.float32), "b": np.zeros((4, 16), np.float32)}
    tuned = {"a": np.ones((8, 8), np.float32), "b": np.ones((4, 16), np.float32)}
    specs = {"a": P("y", "x"), "b": P(None, ("x", "y"))}
    put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in t.items()}
    got = masks.core_mask(put(base), put(tuned), 0.6, "global")  # 76 of 128
    np.testing.assert_array_equal(np.asarray(got["a"]), np.ones((8, 8), bool))
    want_b = np.arange(64).reshape(4, 16) < 12
    np.testing.assert_array_equal(np.asarray(got["b"]), want_b)


@pytest.mark.slow  # compiles the sharded core-mask program
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_core_mask_on_sharded_models_rejects_non_finite_deltas_by_leaf(bad):
    mesh = _mesh((4, 2))
    rng = np.random.default_rng(3)
    base, tuned = _model(rng, np.float32)
    tuned["head"][3, 7] = bad
    with pytest.raises(ValueError, match="leaf 'head'.*NaN or Inf"):
        masks.core_mask(_put(base, mesh), _put(tuned, mesh), 0.1)


def test_core_mask_refuses_mixed_shardings_by_leaf():
    mesh = _mesh((4, 2))
    rng = np.random.default_rng(4)
    base, tuned = _model(rng, np.float32)
    sharded = _put(base, mesh)
    with pytest.raises(ValueError, match="leaf 'embed': tuned is not a jax.Array"):
        masks.core_mask(sharded, tuned, 0.1)
