"""Meshes from the config and Llama-family sharding rules, on 8 faked CPU devices."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from cpift_jax import models, sharding, tree

RULES = sharding.LLAMA_RULES

TINY_QWEN2 = models.ModelConfig(
    model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
)


def mesh_config(shape, **changes):
    config = sharding.default_mesh_config()
    config.shape = tuple(shape)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_needs_eight_devices():
    assert jax.device_count() == 8, "tests/conftest.py fakes 8 CPU devices"


# ------------------------------------------------------------------------------------- mesh


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((8, 1, 1), (8, 1, 1)),
        ((1, 4, 2), (1, 4, 2)),
        ((2, 2, 2), (2, 2, 2)),
        ((-1, 1, 1), (8, 1, 1)),
        ((-1, 2, 1), (4, 2, 1)),
        ((2, -1, 2), (2, 2, 2)),
        ((1, 1, -1), (1, 1, 8)),
    ],
)
def test_make_mesh_from_config(shape, expected):
    mesh = sharding.make_mesh(mesh_config(shape))
    assert tuple(mesh.shape.items()) == tuple(zip(("data", "fsdp", "tensor"), expected))
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


@pytest.mark.slow
def test_default_mesh_on_one_device_keeps_single_device_placement():
    device = jax.devices()[0]
    mesh = sharding.make_mesh(sharding.default_mesh_config(), devices=[device])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    params = models.init_params(TINY_QWEN2, seed=0)
    computed = sharding.shardings(params, mesh, sharding.default_mesh_config())
    placed = sharding.shard(params, computed)
    for path, leaf, original in zip(*tree.flatten(placed)[:2], tree.flatten(params)[1]):
        assert leaf.devices() == {device}, path
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(original), err_msg=path)


def test_abstract_mesh_resolves_like_make_mesh():
    mesh = sharding.abstract_mesh(mesh_config((-1, 8, 4)), 256)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 8, "tensor": 4}
    assert mesh.axis_types == (AxisType.Auto,) * 3


@pytest.mark.parametrize(
    "axes, shape, message",
    [
        (("data", "fsdp", "tensor"), (3, 1, 1), r"mesh\.shape \(3, 1, 1\) multiplies to 3 .* 8"),
        (("data", "fsdp", "tensor"), (2, 2, 1), r"mesh\.shape .* multiplies to 4 .* 8 are given"),
        (("data", "fsdp", "tensor"), (-1, 3, 1), r"mesh\.shape .* divide the 8 devices"),
        (("data", "fsdp", "tensor"), (-1, -1, 1), r"mesh\.shape .* at most one size may be -1"),
        (("data", "fsdp", "tensor"), (0, 1, 8), r"mesh\.shape .* positive ints"),
        (("data", "fsdp", "tensor"), (8, 1), r"mesh\.shape .* 2 sizes but mesh\.axes .* 3"),
        (("data", "data", "tensor"), (8, 1, 1), r"mesh\.axes must be distinct"),
    ],
)
def test_bad_mesh_config_names_the_key(axes, shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(mesh_config(shape, axes=axes))


# ------------------------------------------------------------------------------------ rules

# Every leaf of a two-layer Qwen2 (q/k/v biases), written out for a 2x2x2 mesh.
EXPECTED_QWEN2 = {
    "lm_head/kernel": P("fsdp", "tensor"),
    "model/embed_tokens/embedding": P("tensor", "fsdp"),
    "model/norm/weight": P(None),
    "model/layers/{i}/input_layernorm/weight": P(None),
    "model/layers/{i}/post_attention_layernorm/weight": P(None),
    "model/layers/{i}/self_attn/q_proj/kernel": P("fsdp", "tensor"),
    "model/layers/{i}/self_attn/k_proj/kernel": P("fsdp", "tensor"),
    "model/layers/{i}/self_attn/v_proj/kernel": P("fsdp", "tensor"),
    "model/layers/{i}/self_attn/q_proj/bias": P("tensor"),
    "model/layers/{i}/self_attn/k_proj/bias": P("tensor"),
    "model/layers/{i}/self_attn/v_proj/bias": P("tensor"),
    "model/layers/{i}/self_attn/o_proj/kernel": P("tensor", "fsdp"),
    "model/layers/{i}/mlp/gate_proj/kernel": P("fsdp", "tensor"),
    "model/layers/{i}/mlp/up_proj/kernel": P("fsdp", "tensor"),
    "model/layers/{i}/mlp/down_proj/kernel": P("tensor", "fsdp"),
}


def expected_qwen2_specs():
    out = {}
    for pattern, spec in EXPECTED_QWEN2.items():
        for i in range(TINY_QWEN2.num_hidden_layers):
            out[pattern.format(i=i)] = spec
    return out


def test_llama_rules_cover_qwen2_with_the_written_out_specs():
    mesh = sharding.make_mesh(mesh_config((2, 2, 2)))
    specs = sharding.partition_specs(models.abstract_params(TINY_QWEN2), RULES, mesh)
    paths, leaves, _ = tree.flatten(specs)
    assert dict(zip(paths, leaves)) == expected_qwen2_specs()


def test_llama_rules_cover_biases_and_tied_embeddings():
    config = TINY_QWEN2.replace(model_type="llama", attention_bias=True, attention_out_bias=True,
                                mlp_bias=True, tie_word_embeddings=True)
    mesh = sharding.make_mesh(mesh_config((2, 2, 2)))
    specs = dict(zip(*tree.flatten(
        sharding.partition_specs(models.abstract_params(config), RULES, mesh))[:2]))
    assert "lm_head/kernel" not in specs
    assert specs["model/layers/0/self_attn/o_proj/bias"] == P(None)
    assert specs["model/layers/1/mlp/down_proj/bias"] == P(None)
    assert specs["model/layers/1/mlp/up_proj/bias"] == P("tensor")


def test_coverage_error_names_the_unmatched_leaf():
    mesh = sharding.make_mesh(mesh_config((8, 1, 1)))
    params = {"model": {"layers": [{"mystery": {"kernel": sds(4, 4)}}], "norm": {"weight": sds(4)}}}
    with pytest.raises(ValueError, match=r"leaf 'model/layers/0/mystery/kernel' .* matches no"):
        sharding.tree_shardings(params, RULES, mesh)


@pytest.mark.parametrize("path, shape", [
    ("model/layers/0/mlp/up_proj/kernel", (2, 4, 8)),  # an indexed layer is not stacked
    ("lm_head/kernel", (2, 4, 8)),  # not under layers/
    ("model/layers/mlp/up_proj/kernel", (2, 2, 4, 8)),  # stacked, yet one rank too many
    ("model/layers/mlp/up_proj/kernel", (8,)),
])
def test_rule_of_the_wrong_rank_names_the_leaf(path, shape):
    mesh = sharding.make_mesh(mesh_config((8, 1, 1)))
    params = {}
    *containers, name = path.split("/")
    node = params
    for key in containers:
        node = node.setdefault(key, {})
    node[name] = sds(*shape)
    with pytest.raises(ValueError, match=rf"leaf '{path}' has shape"):
        sharding.partition_specs(params, RULES, mesh)


def test_stacked_layers_get_a_replicated_layers_axis_before_each_layers_partition():
    from cpift_jax.models import scan

    mesh = sharding.make_mesh(mesh_config((1, 4, 2)))
    storage = models.abstract_params(TINY_QWEN2)
    stacked = jax.eval_shape(scan.stack_layers, storage)
    storage_specs = sharding.partition_specs(storage, RULES, mesh)
    stacked_specs = sharding.partition_specs(stacked, RULES, mesh)
    layer_specs = tree.flatten(storage_specs["model"]["layers"][0])
    got = tree.flatten(stacked_specs["model"]["layers"])
    assert got[0] == layer_specs[0] and len(got[0]) == 12  # 9 leaves + qwen2 q/k/v biases
    for path, spec, layer_spec in zip(got[0], got[1], layer_specs[1]):
        assert spec == P(None, *layer_spec), path
    assert stacked_specs["lm_head"] == storage_specs["lm_head"]
    # The logical axis is in the table (replicated by default): a rules table may map it.
    assert dict(sharding.LLAMA_LOGICAL_AXES)[sharding.STACKED_LAYERS_AXIS] is None


def test_fallback_never_moves_a_mesh_axis_onto_the_stacked_layers_axis():
    mesh = sharding.make_mesh(mesh_config((1, 4, 2)))
    # fsdp (4) does not divide 6; it divides the 8 layers, but moves to the mlp dimension
    # as it does for the unstacked layer.
    def spec(layers):
        specs = sharding.partition_specs({"model": {"layers": layers}}, RULES, mesh)
        return specs["model"]["layers"]

    unstacked = spec({0: {"mlp": {"up_proj": {"kernel": sds(6, 16)}}}})
    stacked = spec({"mlp": {"up_proj": {"kernel": sds(8, 6, 16)}}})
    assert unstacked[0]["mlp"]["up_proj"]["kernel"] == P(None, ("tensor", "fsdp"))
    assert stacked["mlp"]["up_proj"]["kernel"] == P(None, None, ("tensor", "fsdp"))


def test_mesh_without_a_ruled_axis_is_an_error():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    with pytest.raises(ValueError, match=r"lm_head/kernel.*mesh axis 'fsdp'"):
        sharding.partition_specs({"lm_head": {"kernel": sds(8, 16)}}, RULES, mesh)


def test_rules_with_an_unknown_logical_axis_fail_at_construction():
    with pytest.raises(ValueError, match=r"logical axis 'heads'"):
        sharding.ShardingRules(leaves=((r".*", ("heads",)),), logical_axes=(("mlp", "tensor"),))


def test_scalars_are_replicated_without_a_rule():
    mesh = sharding.make_mesh(mesh_config((1, 4, 2)))
    out = sharding.tree_shardings({"count": sds(dtype=jnp.int32)}, RULES, mesh)
    assert out["count"] == NamedSharding(mesh, P())


# ---------------------------------------------------------------------------- divisibility


def test_indivisible_dimension_falls_back_to_another_dimension(caplog):
    mesh = sharding.make_mesh(mesh_config((1, 1, 8)))
    params = {
        "model": {"embed_tokens": {"embedding": sds(100, 64)}},  # 100 % 8 != 0, 64 % 8 == 0
        "lm_head": {"kernel": sds(64, 100)},
    }
    with caplog.at_level(logging.WARNING, logger="cpift_jax.sharding"):
        specs = sharding.partition_specs(params, RULES, mesh)
    assert specs["model"]["embed_tokens"]["embedding"] == P(None, ("fsdp", "tensor"))
    assert specs["lm_head"]["kernel"] == P(("fsdp", "tensor"), None)
    logged = caplog.text
    assert "'model/embed_tokens/embedding' shape (100, 64)" in logged
    assert "mesh axis 'tensor'" in logged


def test_no_dividing_dimension_replicates_along_that_axis():
    mesh = sharding.make_mesh(mesh_config((1, 2, 4)))
    # 6 divides by fsdp=2 but nothing divides by tensor=4: sharded on fsdp only.
    specs = sharding.partition_specs({"model": {"embed_tokens": {"embedding": sds(6, 6)}}},
                                     RULES, mesh)
    assert specs["model"]["embed_tokens"]["embedding"] == P(None, "fsdp")
    # Nothing divides either axis: replicated.
    specs = sharding.partition_specs({"lm_head": {"kernel": sds(3, 5)}}, RULES, mesh)
    assert specs["lm_head"]["kernel"] == P(None, None)


def test_qwen15_vocabulary_on_256_devices_falls_back_to_the_hidden_dimension():
    # Qwen1.5-7B: vocabulary 151936 = 2^7 * 1187 does not divide by 256.
    qwen = models.ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=2, num_attention_heads=32, attention_bias=True,
    )
    params = models.abstract_params(qwen)
    mesh = sharding.abstract_mesh(mesh_config((1, 1, -1)), 256)
    out = sharding.shardings(params, mesh, mesh_config((1, 1, -1)))
    assert out["model"]["embed_tokens"]["embedding"].spec == P(None, ("fsdp", "tensor"))
    assert out["lm_head"]["kernel"].spec == P(("fsdp", "tensor"), None)
    assert out["model"]["layers"][1]["mlp"]["up_proj"]["kernel"].spec == P("fsdp", "tensor")


def test_unsharded_fraction_guard_names_fraction_and_largest_leaves():
    mesh = sharding.make_mesh(mesh_config((1, 1, 8)))
    params = {
        "model": {
            "embed_tokens": {"embedding": sds(101, 7)},  # 707 entries, nothing divides by 8
            "layers": [{"mlp": {"up_proj": {"kernel": sds(5, 3)}}}],  # 15 entries, ditto
            "norm": {"weight": sds(8)},  # replicated by design: not counted
        },
        "lm_head": {"kernel": sds(16, 16)},  # 256 entries, sharded
    }
    # (707 + 15) / (707 + 15 + 8 + 256) = 73.2%
    with pytest.raises(ValueError) as err:
        sharding.shardings(params, mesh, mesh_config((1, 1, 8)))
    message = str(err.value)
    assert "73.23%" in message and "722 of 986 entries" in message
    assert "mesh.max_unsharded_fraction=0.05" in message
    assert message.index("'model/embed_tokens/embedding' (101, 7)") < message.index(
        "'model/layers/0/mlp/up_proj/kernel' (5, 3)")
    assert "'model/norm/weight'" not in message
    # A looser limit lets the same layout through.
    out = sharding.shardings(params, mesh, mesh_config((1, 1, 8), max_unsharded_fraction=0.75))
    # fsdp has size 1 here, so keeping it on the embedding spreads nothing.
    assert out["model"]["embed_tokens"]["embedding"].spec == P(None, "fsdp")


def test_data_parallel_mesh_replicates_everything_without_tripping_the_guard():
    mesh = sharding.make_mesh(mesh_config((8, 1, 1)))
    params = models.abstract_params(TINY_QWEN2)
    out = sharding.shardings(params, mesh, mesh_config((8, 1, 1)))
    assert sharding.replicated_fraction(params, out) == 1.0


def test_llama2_7b_layout_planned_from_abstract_params():
    config = models.ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=32, num_attention_heads=32)
    params = models.abstract_params(config)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    mesh = sharding.make_mesh(mesh_config((1, 4, 2)))
    out = sharding.shardings(params, mesh, mesh_config((1, 4, 2)))
    # Only the 65 RMSNorm gains (2 per layer + the final norm) stay whole.
    assert sharding.replicated_fraction(params, out) == pytest.approx(
        65 * 4096 / tree.num_params(params), rel=1e-12)
    assert tree.num_params(params) == 6_738_415_616
    layer = out["model"]["layers"][31]
    assert out["model"]["embed_tokens"]["embedding"] == NamedSharding(mesh, P("tensor", "fsdp"))
    assert out["lm_head"]["kernel"].spec == P("fsdp", "tensor")
    assert layer["self_attn"]["o_proj"]["kernel"].spec == P("tensor", "fsdp")
    assert layer["mlp"]["down_proj"]["kernel"].spec == P("tensor", "fsdp")
    assert layer["post_attention_layernorm"]["weight"].spec == P(None)
    # Per-device bytes of one down_proj shard: 11008 * 4096 * 4 / 8.
    shard_shape = out["model"]["layers"][0]["mlp"]["down_proj"]["kernel"].shard_shape((11008, 4096))
    assert shard_shape == (5504, 1024)


# ------------------------------------------------------------------------ placing and optax


def test_bool_masks_get_their_parameters_partition():
    mesh = sharding.make_mesh(mesh_config((2, 2, 2)))
    params = models.abstract_params(TINY_QWEN2)
    masks = jax.tree.map(lambda x: sds(*x.shape, dtype=jnp.bool_), params)
    assert sharding.tree_shardings(masks, RULES, mesh) == sharding.tree_shardings(
        params, RULES, mesh)


@pytest.mark.slow  # several seconds of compilation: kept out of the fast tier
@pytest.mark.parametrize("shape", [pytest.param((1, 4, 2), marks=pytest.mark.slow), (2, 2, 2)])
def test_shard_places_every_leaf_with_its_computed_sharding(shape):
    mesh = sharding.make_mesh(mesh_config(shape))
    params = models.init_params(TINY_QWEN2, seed=0)
    computed = sharding.shardings(params, mesh, mesh_config(shape))
    placed = sharding.shard(params, computed)
    for path, leaf, want, original in zip(
        *tree.flatten(placed)[:2], tree.flatten(computed)[1], tree.flatten(params)[1]
    ):
        assert leaf.sharding == want, path
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(original), err_msg=path)
    kernel = placed["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]  # (64, 128)
    fsdp, tensor = shape[1], shape[2]
    assert {s.data.shape for s in kernel.addressable_shards} == {(64 // fsdp, 128 // tensor)}


def test_shard_rejects_a_sharding_tree_of_another_structure():
    mesh = sharding.make_mesh(mesh_config((8, 1, 1)))
    params = {"lm_head": {"kernel": jnp.zeros((8, 8))}, "model": {"norm": {"weight": jnp.ones(8)}}}
    wrong = {"lm_head": {"kernel": NamedSharding(mesh, P())},
             "model": {"norms": {"weight": NamedSharding(mesh, P())}}}
    with pytest.raises(ValueError, match=r"'model/norm/weight' meets sharding leaf "
                                         r"'model/norms/weight'"):
        sharding.shard(params, wrong)


def test_adamw_moments_take_the_parameters_shardings():
    mesh = sharding.make_mesh(mesh_config((2, 2, 2)))
    params = models.init_params(TINY_QWEN2, seed=0)
    param_shardings = sharding.shardings(params, mesh, mesh_config((2, 2, 2)))
    placed = sharding.shard(params, param_shardings)
    optimizer = optax.adamw(1e-3, weight_decay=0.1)
    # jit(optimizer.init) alone puts fresh zeros on one device: the state's shardings come from
    # the same rules, applied to its abstract structure (moments under "0/mu/...", "0/nu/...").
    state_shardings = sharding.tree_shardings(jax.eval_shape(optimizer.init, placed), RULES, mesh)
    state = jax.jit(optimizer.init, out_shardings=state_shardings)(placed)
    adam = state[0]
    assert adam.count.sharding == NamedSharding(mesh, P())
    for moments in (adam.mu, adam.nu):
        pairs = zip(*tree.flatten(moments)[:2], tree.flatten(param_shardings)[1], strict=True)
        for path, leaf, want in pairs:
            assert leaf.sharding == want, path
