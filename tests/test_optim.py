"""Tests for cpift_jax.optim: element-wise freezing and the AdamW factory."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from cpift_jax import optim


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _config(**overrides):
    config = optim.default_config()
    config.update(dict(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.0))
    config.update(overrides)
    return config


def test_freeze_replaces_exactly_the_masked_entries_by_negative_zero():
    updates = {
        "a": jnp.array([1.0, 2.0, jnp.nan, 4.0]),
        "b": jnp.array([[1.0, 2.0], [3.0, 4.0]]),
        "c": jnp.array([5.0, jnp.inf]),
    }
    mask = {"a": np.array([False, True, True, False]), "b": True, "c": False}
    tx = optim.freeze(mask)
    out, _ = tx.update(updates, tx.init(updates))
    np.testing.assert_array_equal(out["a"], [1.0, 0.0, 0.0, 4.0])
    np.testing.assert_array_equal(np.signbit(out["a"]), [False, True, True, False])
    np.testing.assert_array_equal(_bits(out["b"]), np.full((2, 2), 0x80000000, np.uint32))
    np.testing.assert_array_equal(out["c"], [5.0, np.inf])


def test_freeze_none_leaves_updates_alone():
    updates = {"a": jnp.array([1.0, jnp.nan]), "b": {"c": jnp.array(3.0)}}
    tx = optim.freeze(None)
    out, _ = tx.update(updates, tx.init(updates))
    np.testing.assert_array_equal(_bits(out["a"]), _bits(updates["a"]))
    assert out["b"]["c"] == 3.0
    mixed = optim.freeze({"a": None, "b": {"c": np.array(False)}})
    out, _ = mixed.update(updates, mixed.init(updates))
    np.testing.assert_array_equal(_bits(out["a"]), _bits(updates["a"]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_frozen_update_keeps_negative_zero_and_every_value_bit_identical(dtype):
    # p + 0.0 turns -0.0 into +0.0; the frozen update must be -0.0 so that nothing changes.
    params = {"p": jnp.array([-0.0, 0.0, 1.5, -2.0, 3e38 if dtype == jnp.float32 else 1e38], dtype)}
    tx = optim.freeze({"p": True})
    updates, _ = tx.update({"p": jnp.ones(5, dtype)}, tx.init(params))
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(_bits(new["p"]), _bits(params["p"]))


def _train(params, mask, dtype, steps=50, learning_rate=1e-2, poison=True):
    """50 jitted AdamW steps on random gradients; frozen entries get NaN / Inf gradients."""
    config = _config(learning_rate=learning_rate, warmup_steps=min(5, steps), total_steps=steps,
                     schedule="cosine", weight_decay=0.1, weight_decay_mask=None)
    tx = optim.make(config, frozen=mask)
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        keys = jax.random.split(key, len(jax.tree.leaves(params)))
        grads = jax.tree.unflatten(
            jax.tree.structure(params),
            [jax.random.normal(k, p.shape, dtype) for k, p in zip(keys, jax.tree.leaves(params))],
        )
        if poison:
            grads["w"] = grads["w"].at[0, 0].set(jnp.nan).at[1, 2].set(jnp.inf)
            grads["b"] = grads["b"].at[3].set(-jnp.inf)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    key = jax.random.key(0)
    for i in range(steps):
        params, state = step(params, state, jax.random.fold_in(key, i))
    return params, state, step


def _params_and_mask(dtype):
    # NumPy draws: an eager jax.random call compiles a program per shape and dtype.
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.standard_normal((6, 8)), dtype).at[0, 0].set(-0.0).at[1, 2].set(-0.0)
    params = {"w": w, "b": jnp.arange(8, dtype=dtype) - 4, "norm": {"scale": jnp.ones(4, dtype)}}
    frozen_w = rng.random((6, 8)) < 0.4
    frozen_w[0, 0] = frozen_w[1, 2] = True  # the -0.0 entries with NaN / Inf gradients
    frozen_b = np.zeros(8, bool)
    frozen_b[[3, 5]] = True
    return params, {"w": frozen_w, "b": frozen_b, "norm": {"scale": False}}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_adamw_steps_leave_frozen_entries_bit_identical(dtype):
    params, mask = _params_and_mask(dtype)
    # bf16 has 8 significant bits: a larger step so that every free entry visibly moves.
    learning_rate = 1e-2 if dtype == jnp.float32 else 0.1
    new, state, step = _train(params, mask, dtype, learning_rate=learning_rate)
    for name in ("w", "b"):
        frozen = mask[name]
        old_bits, new_bits = _bits(params[name]), _bits(new[name])
        np.testing.assert_array_equal(new_bits[frozen], old_bits[frozen])
        free = np.asarray(new[name], np.float32)[~frozen]
        assert np.isfinite(free).all()
        assert (free != np.asarray(params[name], np.float32)[~frozen]).all()
    assert (np.asarray(new["norm"]["scale"], np.float32) != 1.0).all()

    adam = state.inner[1]
    for moments in (adam.mu, adam.nu):
        for name in ("w", "b"):
            frozen_bits = _bits(moments[name])[mask[name]]
            np.testing.assert_array_equal(frozen_bits, np.zeros_like(frozen_bits))
            assert (np.asarray(moments[name], np.float32)[~mask[name]] != 0).all()

    # The mask is an argument of the jitted step, not a constant baked into it.
    hlo = step.lower(params, state, jax.random.key(0)).as_text()
    signature = hlo[hlo.index("func.func public @main"):].split("\n")[0]
    assert "tensor<6x8xi1>" in signature and "tensor<8xi1>" in signature
    assert not any("constant" in line and "xi1>" in line for line in hlo.splitlines())


def test_nan_gradients_poison_an_unfrozen_optimizer():
    # Guards the test above: without freezing, the same NaN / Inf gradients do destroy params.
    params, _ = _params_and_mask(jnp.float32)
    new, _, _ = _train(params, None, jnp.float32, steps=3)
    assert np.isnan(np.asarray(new["w"])).all()


@pytest.mark.slow
def test_jitted_update_matches_eager_update():
    params, mask = _params_and_mask(jnp.float32)
    tx = optim.make(_config(weight_decay=0.1, weight_decay_mask=None), frozen=mask)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    eager, _ = tx.update(grads, state, params)
    jitted, _ = jax.jit(tx.update)(grads, state, params)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_clip_norm_ignores_frozen_gradients():
    # Trainable gradient (3, 4) has norm 5: with clip 5 nothing is clipped, whatever the frozen
    # entry's gradient is (1e6 or NaN); only the first freeze makes that so.
    config = _config(grad_clip_norm=5.0, b1=0.0, b2=0.0, eps=1e-30)
    params = {"w": jnp.zeros(3)}
    reference_tx = optim.make(config)
    reference, _ = reference_tx.update(
        {"w": jnp.array([3.0, 4.0, 0.0])}, reference_tx.init(params), params
    )
    tx = optim.make(config, frozen={"w": np.array([False, False, True])})
    for frozen_grad in (1e6, jnp.nan):
        out, _ = tx.update({"w": jnp.array([3.0, 4.0, frozen_grad])}, tx.init(params), params)
        np.testing.assert_allclose(out["w"][:2], reference["w"][:2], rtol=1e-6)
        np.testing.assert_allclose(out["w"][:2], [-0.1, -0.1], rtol=1e-6)  # Adam: sign * lr
        assert np.signbit(out["w"][2]) and out["w"][2] == 0.0


@pytest.mark.parametrize(
    "mask, message",
    [
        ({"w": np.zeros((6, 7), bool), "b": False, "norm": {"scale": False}},
         r"leaf 'w': params has shape \(6, 8\), mask has shape \(6, 7\)"),
        ({"w": False, "norm": {"scale": False}}, "leaf 'b' is in params but missing from mask"),
        ({"w": False, "b": False, "norm": {"scale": False}, "x": False},
         "leaf 'x' is in mask but missing from params"),
        ({"w": np.zeros((6, 8), np.uint8), "b": False, "norm": {"scale": False}},
         "leaf 'w': mask has dtype uint8, expected bool"),
    ],
)
def test_mask_mismatch_names_the_leaf(mask, message):
    params, _ = _params_and_mask(jnp.float32)
    with pytest.raises(ValueError, match=message):
        optim.make(_config(), frozen=mask).init(params)


def test_works_on_nnx_state_with_a_pure_dict_mask():
    params = nnx.state(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Param)
    mask = {"kernel": np.array([[True, False], [False, False], [False, True]]), "bias": False}
    tx = optim.make(_config(weight_decay=0.1), frozen=mask)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    kernel_old, kernel_new = np.asarray(params["kernel"][...]), np.asarray(new["kernel"][...])
    np.testing.assert_array_equal(kernel_new == kernel_old, mask["kernel"])


def test_weight_decay_rules_skip_biases_and_norms():
    # Zero gradients: Adam contributes 0, so the update is -lr * weight_decay * param where decayed.
    params = {
        "dense": {"kernel": jnp.array([2.0]), "bias": jnp.array([2.0])},
        "input_layernorm": {"scale": jnp.array([2.0])},
    }
    tx = optim.make(_config(weight_decay=0.5))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert updates["dense"]["kernel"] == pytest.approx(-0.1)
    assert updates["dense"]["bias"] == 0.0 and updates["input_layernorm"]["scale"] == 0.0
    everything = optim.make(_config(weight_decay=0.5, weight_decay_mask=None))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = everything.update(zeros, everything.init(params), params)
    assert updates["dense"]["bias"] == pytest.approx(-0.1)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]),
        ("cosine", [0.0, 0.5, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                    (1 + math.cos(3 * math.pi / 4)) / 2, 0.0, 0.0]),
    ],
)
def test_learning_rate_schedules(schedule, expected):
    config = _config(learning_rate=1.0, warmup_steps=2, total_steps=6, schedule=schedule)
    lr = optim.learning_rate_schedule(config)
    np.testing.assert_allclose([lr(s) for s in range(8)], expected, atol=1e-6)


def test_final_lr_ratio_and_no_warmup():
    config = _config(learning_rate=1.0, total_steps=4, schedule="linear", final_lr_ratio=0.2)
    lr = optim.learning_rate_schedule(config)
    np.testing.assert_allclose([lr(s) for s in range(6)], [1.0, 0.8, 0.6, 0.4, 0.2, 0.2], atol=1e-6)


def test_default_config_builds_and_lists_every_field():
    config = optim.default_config()
    assert set(config.keys()) == {
        "learning_rate", "warmup_steps", "total_steps", "schedule", "final_lr_ratio", "b1", "b2",
        "eps", "weight_decay", "weight_decay_mask", "grad_clip_norm",
    }
    params = {"w": jnp.ones(2)}
    tx = optim.make(config)
    tx.update({"w": jnp.ones(2)}, tx.init(params), params)


def test_any_attribute_object_works_as_config():
    class Plain:
        learning_rate, warmup_steps, total_steps, schedule = 0.1, 0, 10, "constant"
        b1, b2, eps, weight_decay, grad_clip_norm = 0.9, 0.99, 1e-8, 0.0, None

    params = {"w": jnp.ones(2)}
    tx = optim.make(Plain())
    updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.1, -0.1], rtol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"schedule": "step"}, "'schedule' must be one of cosine, constant, linear, got 'step'"),
        ({"learning_rate": 0.0}, r"'learning_rate' must be a finite number in \(0.0, inf\]"),
        ({"warmup_steps": 20, "total_steps": 10}, r"'warmup_steps' \(20\) exceeds 'total_steps'"),
        ({"total_steps": 2.5}, "'total_steps' must be an integer >= 1, got 2.5"),
        ({"b1": 1.0}, r"'b1' must be a finite number in \[0.0, 1.0\)"),
        ({"eps": 0.0}, "'eps' must be a finite number"),
        ({"weight_decay": -1.0}, "'weight_decay' must be a finite number"),
        ({"grad_clip_norm": float("nan")}, "'grad_clip_norm' must be a finite number"),
        ({"weight_decay_mask": (("bias", "no"),)}, "'weight_decay_mask' must be a list of"),
        ({"final_lr_ratio": 2.0}, "'final_lr_ratio' must be in"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    config = ml_collections.ConfigDict(_config().to_dict(), type_safe=False)
    for key, value in overrides.items():
        config[key] = value
    with pytest.raises(ValueError, match=message):
        optim.make(config)


def test_missing_config_field_is_named():
    config = _config()
    del config["b2"]
    with pytest.raises(ValueError, match="optimizer config has no field 'b2'"):
        optim.make(config)


def test_freeze_mask_state_has_the_params_structure_and_splits_by_pattern():
    params, mask = _params_and_mask(jnp.float32)
    mask["norm"]["scale"] = True
    state = optim.make(_config(), frozen=mask).init(params)
    stored = state.freeze.mask
    assert stored["norm"]["scale"] is None  # a whole leaf: kept in the pattern, not as an array
    np.testing.assert_array_equal(stored["w"], mask["w"])
    assert jax.tree.structure(stored) == jax.tree.structure(
        {"w": 0, "b": 0, "norm": {"scale": None}})
    pattern, arrays = optim.split_freeze_mask(mask, params)
    assert pattern == optim.freeze_pattern(mask)
    assert dict(pattern) == {"w": "array", "b": "array", "norm/scale": True}
    joined = optim.join_freeze_mask(pattern, arrays)
    assert joined["norm"]["scale"] is True and joined["w"] is mask["w"]
    # A mask of the same pattern but other values gives the same compiled-update key.
    other = dict(mask, w=~mask["w"])
    assert optim.freeze_pattern(other) == pattern


def test_schedule_numbers_are_state_not_constants():
    params = {"w": jnp.ones(3)}
    update = jax.jit(lambda tx_state, g: optim.make(_config()).update(g, tx_state, params))
    grads = {"w": jnp.ones(3)}
    for lr in (0.1, 0.3):
        out, state = update(optim.make(_config(learning_rate=lr)).init(params), grads)
        np.testing.assert_allclose(out["w"], -lr, rtol=1e-5)  # Adam's first step: sign * lr
    assert update._cache_size() == 1 and int(state[-1].count) == 1
