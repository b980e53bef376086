"""cpift_jax.memory_plan: the planned train-step bytes against a real train state on 8 devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cpift_jax import models, optim, sharding
from cpift_jax.training import step as step_lib
from cpift_jax import memory_plan as plan

TINY = models.ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=64)
STEP = step_lib.StepConfig(micro_batches=2, remat="layer", scan_layers=True,
                           compute_dtype="bfloat16", vocab_chunk=64)


def _mesh():
    return sharding.make_mesh(ml_collections.ConfigDict(
        {"axes": ("data", "fsdp", "tensor"), "shape": (2, 4, 1)}))


def _per_device_bytes(tree) -> dict:
    """Bytes each device holds of ``tree``'s arrays (sum of addressable shards)."""
    held = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


@pytest.mark.slow  # compiles and runs the step: about 18 s here
def test_planned_arguments_are_the_placed_state_and_batch():
    mesh, opt = _mesh(), optim.default_config()
    rows, seq = 16, 32
    planned = plan.plan_step(TINY, opt, mesh, (rows, seq), STEP)

    # The real thing: parameters stacked onto the mesh, an element-wise freeze mask, the
    # optimizer state from the layout's init, and a batch on the batch sharding.
    pattern = optim.freeze_pattern(plan.abstract_frozen(TINY))
    compiled = step_lib.train_step(TINY, opt, mesh, (rows, seq), STEP, pattern)
    layout = compiled.layout
    params = jax.device_put(models.init_params(TINY, 0), layout.storage_shardings)
    frozen = jax.tree.map(lambda p: jnp.zeros(p.shape, bool), params)
    frozen = jax.device_put(frozen, layout.storage_mask_shardings)
    params, frozen = layout.enter(params, frozen)
    state = step_lib.TrainState(params, layout.init(params, frozen, optim.schedule_numbers(opt)),
                                step_lib.replicated_step(0, layout.shardings.step))
    batch = jax.device_put({"tokens": np.zeros((rows, seq), np.int32),
                            "loss_mask": np.ones((rows, seq), bool)}, compiled.batch_shardings)
    held = _per_device_bytes((state, batch))
    assert len(held) == 8 and len(set(held.values())) == 1, held
    assert planned.argument == next(iter(held.values()))
    assert planned.parts["params"] == _per_device_bytes(state.params)[mesh.devices.flat[0]]
    assert planned.parts["freeze mask"] > 0 and planned.parts["optimizer moments"] > 0
    # The state is donated: the updated state reuses its buffers.
    assert planned.alias == planned.argument - planned.parts["batch"]
    assert planned.peak == (planned.argument + planned.output - planned.alias + planned.temp
                            + planned.code)

    # And the step runs on that state.
    state, metrics = compiled.step(state, batch)
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.slow  # two step compiles: 8 s alone, more on a busy machine
def test_too_large_batch_does_not_fit_a_small_device():
    mesh, opt = _mesh(), optim.default_config()
    small = plan.plan_step(TINY, opt, mesh, (16, 32), STEP)
    large = plan.plan_step(TINY, opt, mesh, (256, 64), STEP)
    assert large.temp > 4 * small.temp  # activations grow with the rows and tokens
    budget = (small.peak + large.peak) // 2  # a fake device between the two
    assert plan.fits(small, budget, headroom=1.0)
    assert not plan.fits(large, budget, headroom=1.0)
    assert "DOES NOT FIT" in plan.format_plan(large, budget, 1.0)
    assert ": fits" in plan.format_plan(small, budget, 1.0)


@pytest.mark.slow  # one more step compile
def test_packed_step_plans_the_document_arrays_too():
    """Packed rows carry segment ids and positions (int32 each) besides the tokens (int32) and
    the loss mask (bool): 13 bytes per token slot instead of 5, spread like the batch."""
    mesh, opt = _mesh(), optim.default_config()
    plain = plan.plan_step(TINY, opt, mesh, (16, 32), STEP)
    packed = plan.plan_step(TINY, opt, mesh, (16, 32), STEP, packed=True)
    assert packed.parts["batch"] * 5 == plain.parts["batch"] * 13
    assert packed.parts["params"] == plain.parts["params"]
    assert packed.argument - plain.argument == packed.parts["batch"] - plain.parts["batch"]
