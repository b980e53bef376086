"""Training on meshes of 8 faked CPU devices equals training on one device, keeps frozen entries
bit-identical, and leaves every parameter, Adam moment and freeze-mask leaf with its planned
sharding (the parameter's)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from cpift_jax import models, optim, sharding
from cpift_jax import tree as tree_lib
from cpift_jax.training import step as step_lib
from cpift_jax.training import train as train_lib

# Every sharded dimension (hidden 16, heads 2 x 8 = 16, kv 8, mlp 32, vocab 40) divides by 4.
CONFIG = models.ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=64)
STEPS = 20


def _mesh(shape):
    config = sharding.default_mesh_config()
    config.shape = shape  # axes ("data", "fsdp", "tensor")
    return sharding.make_mesh(config)


def _opt():
    config = optim.default_config()
    config.learning_rate, config.warmup_steps, config.total_steps = 1e-2, 3, STEPS
    config.weight_decay = 0.01
    return config


def _data():
    rng = np.random.default_rng(0)
    return [{"tokens": rng.integers(0, CONFIG.vocab_size, (8, 12)).astype(np.int32),
             "loss_mask": rng.random((8, 12)) < 0.7} for _ in range(STEPS)]


def _frozen(params):
    rng = np.random.default_rng(1)
    mask = jax.tree.map(lambda x: rng.random(x.shape) < 0.4, params)
    mask["model"]["norm"]["weight"] = True  # a whole leaf frozen by a Python bool
    return mask


def _run(mesh, step_config=None):
    params = models.init_params(CONFIG, 0)
    out, history = train_lib.train(
        CONFIG, params, _opt(), iter(_data()), steps=STEPS, frozen=_frozen(params),
        log_every=1, progress=False, mesh=mesh, step_config=step_config)
    return params, out, [r["loss"] for r in history]


def _state_inside(mesh, step_config=None, steps=2):
    """The state as ``train()`` holds it: a fresh state in the step's layout after ``steps``
    compiled steps (the step ``train()`` uses, from the cache)."""
    params = models.init_params(CONFIG, 0)
    pattern, arrays = optim.split_freeze_mask(_frozen(params), params)
    compiled = step_lib.train_step(CONFIG, _opt(), mesh, (8, 12), step_config, pattern)
    state = train_lib._fresh_state(compiled.layout, params, arrays, _opt())
    for batch in _data()[:steps]:
        state, _ = compiled.step(state, jax.device_put(batch, compiled.batch_shardings))
    return state


_REFERENCE = {}


def _reference():
    if not _REFERENCE:
        _, out, losses = _run(None)
        _REFERENCE.update(params=jax.device_get(out), losses=losses)
    return _REFERENCE


def _spec_by_param_path(tree, params):
    """Leaf path -> (sharding, the parameter path it ends with)."""
    param_paths = tree_lib.leaf_paths(params)
    out = {}
    for path, leaf in zip(*tree_lib.flatten(tree)[:2]):
        owner = [p for p in param_paths if path == p or path.endswith("/" + p)]
        out[path] = (leaf, owner[0] if owner else None)
    return out


@pytest.mark.parametrize("shape", [
    pytest.param((8, 1, 1), marks=pytest.mark.slow, id="8x1"),
    pytest.param((1, 4, 2), marks=pytest.mark.slow, id="4x2"),
    pytest.param((2, 1, 4), marks=pytest.mark.slow, id="2x4"),
])
def test_mesh_training_equals_one_device_and_keeps_shardings(shape):
    mesh = _mesh(shape)
    params, out, losses = _run(mesh)
    reference = _reference()
    np.testing.assert_allclose(losses, reference["losses"], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=2e-6),
                 out, reference["params"])

    frozen = _frozen(params)

    def frozen_kept(before, after, mask):
        before, after = np.asarray(before), np.asarray(after)
        mask = np.broadcast_to(mask, before.shape)
        np.testing.assert_array_equal(after[mask].view(np.uint32), before[mask].view(np.uint32))
        assert mask.all() or np.any(after[~mask] != before[~mask])

    jax.tree.map(frozen_kept, params, out, frozen)
    _assert_storage_shardings(out, mesh)
    _assert_state_shardings(_state_inside(mesh), mesh)
    if shape[2] > 1:  # the tensor axis is really used
        assert "tensor" in str(out["lm_head"]["kernel"].sharding.spec)


def _assert_storage_shardings(params, mesh):
    planned = sharding.tree_shardings(models.abstract_params(CONFIG), sharding.LLAMA_RULES, mesh)
    jax.tree.map(_assert_sharding, params, planned)


def _assert_state_shardings(state, mesh):
    """Every parameter, Adam moment and freeze-mask leaf of the state has its planned sharding,
    and each opt-state leaf of rank >= 1 has its parameter's; all three kinds are there."""
    planned_params = sharding.tree_shardings(state.params, sharding.LLAMA_RULES, mesh)
    jax.tree.map(_assert_sharding, state.params, planned_params)
    planned_state = sharding.tree_shardings(state.opt_state, sharding.LLAMA_RULES, mesh)
    jax.tree.map(_assert_sharding, state.opt_state, planned_state)
    kinds = set()
    param_leaves = tree_lib.flatten(planned_params)[1]
    for path, (leaf, owner) in _spec_by_param_path(state.opt_state, state.params).items():
        if leaf.ndim == 0:
            continue
        assert owner is not None, path
        index = tree_lib.leaf_paths(state.params).index(owner)
        _assert_sharding(leaf, param_leaves[index])
        kinds.update(k for k in ("mu", "nu", "mask") if f"/{k}/" in f"/{path}")
    assert kinds == {"mu", "nu", "mask"}


@pytest.mark.slow
def test_scanned_state_is_stacked_with_each_layers_sharding():
    """With scan_layers the state inside holds [num_layers, ...] leaves (a handful, whatever
    the depth), each sharded as its unstacked layer behind a replicated layers axis."""
    mesh = _mesh((1, 4, 2))
    state = _state_inside(mesh, step_lib.StepConfig(scan_layers=True, remat="layer"), steps=1)
    _assert_state_shardings(state, mesh)
    layers = state.params["model"]["layers"]
    assert set(layers) == {"input_layernorm", "post_attention_layernorm", "self_attn", "mlp"}
    storage = sharding.tree_shardings(models.abstract_params(CONFIG), sharding.LLAMA_RULES, mesh)
    for name, kernel in (("q", layers["self_attn"]["q_proj"]["kernel"]),
                         ("down", layers["mlp"]["down_proj"]["kernel"])):
        assert kernel.shape[0] == CONFIG.num_hidden_layers, name
        per_layer = storage["model"]["layers"][0][{"q": "self_attn", "down": "mlp"}[name]]
        per_layer = per_layer[f"{name}_proj"]["kernel"].spec
        assert kernel.sharding.spec == PartitionSpec(None, *per_layer), name
    assert "tensor" in str(layers["mlp"]["down_proj"]["kernel"].sharding.spec)


def _assert_sharding(leaf, planned):
    assert leaf.sharding == planned, (leaf.sharding, planned)


@pytest.mark.slow
def test_mesh_with_all_step_options_equals_one_device():
    mesh = _mesh((2, 2, 2))
    options = step_lib.StepConfig(scan_layers=True, remat="layer", micro_batches=2,
                                  vocab_chunk=16)
    _, out, losses = _run(mesh, options)
    reference = _reference()
    np.testing.assert_allclose(losses, reference["losses"], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=2e-6),
                 out, reference["params"])
    _assert_storage_shardings(out, mesh)
    _assert_state_shardings(_state_inside(mesh, options), mesh)


@pytest.mark.slow
def test_jax_arrays_already_on_the_batch_sharding_are_used_as_they_are():
    mesh = _mesh((1, 4, 2))  # the fast mesh test's: its compiled step is reused
    data = _data()[:2]
    compiled = step_lib.train_step(CONFIG, _opt(), mesh, (8, 12), None,
                                   optim.freeze_pattern(_frozen(models.init_params(CONFIG, 0))))
    placed = [jax.device_put(b, compiled.batch_shardings) for b in data]
    params = models.init_params(CONFIG, 0)
    a, _ = train_lib.train(CONFIG, params, _opt(), iter(data), steps=2, frozen=_frozen(params),
                           progress=False, mesh=mesh)
    b, _ = train_lib.train(CONFIG, params, _opt(), iter(placed), steps=2, frozen=_frozen(params),
                           progress=False, mesh=mesh)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert placed[0]["tokens"].is_deleted() is False  # batches are not donated
