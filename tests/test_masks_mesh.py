"""Core masks and their statistics on a device mesh: a tiny Llama sharded with the project's rules
(``sharding.LLAMA_RULES``) on 8 faked CPU devices (tests/conftest.py), meshes 8x1, 4x2, 2x4.

Everything is compared exactly with the one-device (host) results, and every mask leaf's
``sharding`` is asserted, not just its values.
"""

import collections
import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from cpift_jax import mask_stats, masks, sharding, tree
from cpift_jax.models import init_params
from cpift_jax.models.config import ModelConfig

TINY_LLAMA = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
MESHES = [pytest.param((8, 1), marks=pytest.mark.slow), (4, 2),
          pytest.param((2, 4), marks=pytest.mark.slow)]


def make_mesh(shape):
    config = ml_collections.ConfigDict({"axes": ("fsdp", "tensor"), "shape": shape})
    return sharding.make_mesh(config)


def llama_models(n_tuned=2, seed=0):
    """Host base and tuned parameters; deltas on a grid of 1/256, so many tie at a threshold."""
    base = jax.tree.map(np.asarray, init_params(TINY_LLAMA, seed))
    rng = np.random.default_rng(seed)

    def tune(x):
        step = np.round(rng.standard_normal(x.shape) * 2) / 256 * (rng.random(x.shape) < 0.7)
        return (x + step).astype(x.dtype)

    return base, [jax.tree.map(tune, base) for _ in range(n_tuned)]


def on_mesh(tree_, mesh):
    """``tree_`` placed with the Llama rules' shardings on ``mesh``, and those shardings."""
    shardings = sharding.tree_shardings(tree_, sharding.LLAMA_RULES, mesh)
    return sharding.shard(tree_, shardings), shardings


def assert_on_mesh(tree_, shardings):
    """Every leaf has exactly its expected sharding, and none sits on a single device."""
    for path, leaf, want in zip(tree.leaf_paths(tree_), jax.tree.leaves(tree_),
                                jax.tree.leaves(shardings)):
        assert leaf.sharding == want, f"{path}: {leaf.sharding} != {want}"
        assert len(leaf.sharding.device_set) == want.mesh.size, path


def assert_same_masks(got, want):
    for path, g, w in zip(tree.leaf_paths(want), jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=path)


@pytest.mark.slow  # compiles one sharded core-mask program per mesh and option set
@pytest.mark.parametrize("shape", [(8, 1), (4, 2), (2, 4)])
def test_core_masks_on_a_llama_mesh_equal_one_device_and_keep_shardings(shape):
    mesh = make_mesh(shape)
    base, tuned = llama_models()
    sharded_base, shardings = on_mesh(base, mesh)
    for kwargs in ({"fraction": 0.05}, {"fraction": 0.2, "exclude": "norm"},
                   {"fraction": 0.1, "scope": "leaf"}):
        want = masks.core_mask(base, tuned[0], **kwargs)
        got = masks.core_mask(sharded_base, on_mesh(tuned[0], mesh)[0], **kwargs)
        assert_same_masks(got, want)
        assert_on_mesh(got, shardings)


@pytest.mark.parametrize("shape", [pytest.param(s, marks=pytest.mark.slow)
                                   for s in ((8, 1), (4, 2), (2, 4))])
def test_overlap_jaccard_and_density_of_sharded_masks_equal_the_host_ones(shape):
    mesh = make_mesh(shape)
    base, _ = llama_models(0)
    rng = np.random.default_rng(1)
    host = [jax.tree.map(lambda x, d=d: rng.random(x.shape) < d, base) for d in (0.05, 0.3, 0.0)]
    sharded = [on_mesh(m, mesh)[0] for m in host]
    assert masks.overlap_matrix(sharded).tolist() == masks.overlap_matrix(host).tolist()
    assert masks.jaccard(sharded[0], sharded[1]) == masks.jaccard(host[0], host[1])
    assert masks.jaccard(sharded[2], sharded[2]) == 1.0  # both empty: identical sets
    assert masks.density(sharded[1]) == masks.density(host[1])
    assert (masks.density_by_group(sharded[0], tree.layer_index)
            == masks.density_by_group(host[0], tree.layer_index))
    # Host-path counts are independent of the device path: check one against plain NumPy.
    flat = [np.concatenate([x.reshape(-1) for x in jax.tree.leaves(m)]) for m in host]
    assert masks.density(sharded[0])["count"] == int(flat[0].sum())
    assert masks.jaccard(sharded[0], sharded[1]) == (flat[0] & flat[1]).sum() / (flat[0] | flat[1]).sum()


def test_device_counts_over_row_chunks_are_exact(monkeypatch):
    """A leaf past the int32 chunk limit is counted in row chunks summed as Python ints; a small
    limit makes these leaves take that path."""
    mesh = make_mesh((4, 2))
    monkeypatch.setattr(mask_stats, "_CHUNK_LIMIT", 100)
    rng = np.random.default_rng(2)
    host = [{"w": rng.random((48, 16)) < 0.4, "v": rng.random((24,)) < 0.5} for _ in range(2)]
    assert mask_stats._row_chunks("w", (48, 16)) == tuple((s, min(s + 6, 48)) for s in range(0, 48, 6))
    sharded = [jax.device_put(m, jax.sharding.NamedSharding(mesh, jax.P("fsdp"))) for m in host]
    counts = mask_stats.pair_counts(["w"], [[sharded[0]["w"], sharded[1]["w"]]])[0]
    a, b = host[0]["w"], host[1]["w"]
    assert counts.tolist() == [[a.sum(), (a & b).sum()], [(a & b).sum(), b.sum()]]
    assert masks.overlap_matrix(sharded).tolist() == masks.overlap_matrix(host).tolist()
    with pytest.raises(ValueError, match="mask leaf 'x': one slice along axis 0 of shape"):
        mask_stats._row_chunks("x", (2, 101))


def test_core_mask_on_one_accelerator_runs_on_device_and_flags_non_finite_by_leaf(monkeypatch):
    """The one-device program (what a GPU or TPU takes) gives the host masks, and its NaN/Inf
    check is one flag per leaf reduced on device. Forced here on the CPU."""
    rng = np.random.default_rng(3)
    base = {"a": rng.standard_normal((16, 8)).astype(np.float32),
            "b": rng.standard_normal((40,)).astype(np.float32)}
    tuned = {k: (v + np.round(rng.standard_normal(v.shape)) / 8).astype(np.float32)
             for k, v in base.items()}
    want = masks.core_mask(base, tuned, 0.3)  # host counting passes
    monkeypatch.setattr(masks, "_on_accelerator", lambda pairs: True)
    device = jax.devices()[0]
    masks.leaf_program.cache_clear()
    got = masks.core_mask(jax.device_put(base, device), jax.device_put(tuned, device), 0.3)
    assert_same_masks(got, want)
    # The per-leaf device passes ran: high, low, counts and mask or cut, for each of 2 shapes.
    assert masks.leaf_program.cache_info().currsize == 8
    tuned["b"][7] = np.nan
    with pytest.raises(ValueError, match="leaf 'b': .tuned - base. has NaN or Inf"):
        masks.core_mask(jax.device_put(base, device), jax.device_put(tuned, device), 0.3)


def _compiled_leaf_programs(run) -> list[str]:
    """Names of the per-leaf core-mask programs XLA compiles while ``run()`` runs."""
    names = []

    def listener(event, duration, fun_name="", **_):
        if event == "/jax/core/compile/backend_compile_duration" and "core_mask_" in fun_name:
            names.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        run()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return sorted(names)


@pytest.mark.slow  # compiles the per-leaf programs twice (about 10 s)
def test_sharded_core_mask_compiles_the_same_programs_whatever_the_depth():
    """One program per pass and leaf kind (shape, dtypes, sharding), each compiled once: a
    6-layer Llama compiles as many counting programs as a 2-layer one, and mask programs for at
    most one leaf kind more (the one leaf whose ties are cut takes the "cut" program)."""
    mesh = make_mesh((4, 2))
    compiled, kinds = {}, {}
    for layers in (2, 6):
        config = dataclasses.replace(TINY_LLAMA, num_hidden_layers=layers)
        base = jax.tree.map(np.asarray, init_params(config, 0))
        step = lambda x: (np.arange(x.size).reshape(x.shape) % 5 / 256).astype(x.dtype)  # ties
        tuned = jax.tree.map(lambda x: x + step(x), base)
        want = masks.core_mask(base, tuned, 0.05)
        sharded_base, shardings = on_mesh(base, mesh)
        sharded = sharded_base, on_mesh(tuned, mesh)[0]
        masks.leaf_program.cache_clear()  # fresh programs: each one compiles again
        got = {}
        names = _compiled_leaf_programs(lambda: got.update(mask=masks.core_mask(*sharded, 0.05)))
        assert_same_masks(got["mask"], want)
        assert len(names) == masks.leaf_program.cache_info().currsize  # each compiled once
        compiled[layers] = collections.Counter(n.split("core_mask_")[1].rstrip(")") for n in names)
        kinds[layers] = {(x.shape, x.dtype, s.spec) for x, s in zip(jax.tree.leaves(base),
                                                                     jax.tree.leaves(shardings))}
    assert kinds[6] == kinds[2] and len(kinds[6]) < len(jax.tree.leaves(base)) // 4
    for counts in compiled.values():
        assert [counts[p] for p in ("high", "low", "counts")] == [len(kinds[2])] * 3
        assert len(kinds[2]) <= counts["mask"] + counts["cut"] <= len(kinds[2]) + 1


def test_ties_are_handed_to_leaves_in_order_in_exact_integers():
    big = 2**32 + 10
    assert masks._split_ties(2**33 + 5, [2**32, 3, big, 7]) == [2**32, 3, 2**32 + 2, 0]
    assert masks._split_ties(0, [4, 0]) == [0, 0]
    assert masks._split_ties(4, [0, 4]) == [0, 4]


@pytest.mark.slow
def test_sharded_core_mask_refuses_a_leaf_shard_past_int32_by_name(monkeypatch):
    mesh = make_mesh((4, 2))
    base, tuned = llama_models(1)
    monkeypatch.setattr(masks.select_xla, "SHARD_LIMIT", 100)  # stands for 2^31
    with pytest.raises(ValueError, match=r"core_mask: leaf '[^']+': \d+ entries in one shard"):
        masks.core_mask(on_mesh(base, mesh)[0], on_mesh(tuned[0], mesh)[0], 0.1)


class _RemoteMask:
    """Stands for a mask leaf that spans devices of another process (unreadable here)."""

    shape, dtype, is_fully_addressable = (4,), np.dtype(bool), False


def test_pack_refuses_leaves_of_other_processes_and_unpack_places_with_like():
    with pytest.raises(ValueError, match="pack: mask leaf 'w' spans devices of other processes"):
        masks.pack({"v": np.ones(3, bool), "w": _RemoteMask()})
    mesh = make_mesh((4, 2))
    m = {"w": np.arange(64).reshape(16, 4) % 3 == 0}
    target = jax.sharding.NamedSharding(mesh, jax.P("fsdp", "tensor"))
    like = {"w": jax.ShapeDtypeStruct((16, 4), np.float32, sharding=target)}
    out = masks.unpack(masks.pack(m), like)
    assert out["w"].sharding == target
    np.testing.assert_array_equal(np.asarray(out["w"]), m["w"])
