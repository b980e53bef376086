"""The compile-once train step: step options against the plain step, chunked cross-entropy,
the schedule in optimizer state, one executable for every stage, resuming."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpift_jax import models, optim
from cpift_jax.models import scan as scan_lib
from cpift_jax.training import loss as loss_lib
from cpift_jax.training import step as step_lib
from cpift_jax.training import train as train_lib

# vocab 37: no chunk size below tests divides it, so the overlapping tail chunk is exercised.
CONFIG = models.ModelConfig(vocab_size=37, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=64)
TIED = models.ModelConfig(vocab_size=37, hidden_size=16, intermediate_size=32,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=64, tie_word_embeddings=True)


def _batch(rows=8, seq=12, seed=0):
    rng = np.random.default_rng(seed)
    mask = rng.random((rows, seq)) < 0.6
    mask[1::2, : seq // 2] = False  # odd rows carry fewer tokens: micro-batch counts differ
    return {"tokens": rng.integers(0, CONFIG.vocab_size, (rows, seq)).astype(np.int32),
            "loss_mask": mask}


def _opt(steps=3, lr=1e-2, warmup=0, schedule="cosine"):
    config = optim.default_config()
    config.learning_rate, config.warmup_steps, config.total_steps = lr, warmup, steps
    config.schedule = schedule
    return config


def _close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                         rtol=rtol, atol=atol), a, b)


@pytest.mark.slow
def test_chunked_nll_equals_the_full_softmax_with_a_tail_chunk():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((5, 7, 8)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((8, 37)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 37, (5, 7)))
    targets = targets.at[0, 0].set(36).at[0, 1].set(32)  # in the overlap of the tail chunk
    mask = jnp.asarray(rng.random((5, 7)) < 0.7)

    def reference(h, k):
        loss, count = loss_lib.masked_cross_entropy(h @ k, targets, mask)
        return loss * count

    want, want_grads = jax.jit(jax.value_and_grad(reference, argnums=(0, 1)))(hidden, kernel)
    for chunk in (0, 5, 16, 64):
        fn = lambda h, k: loss_lib.chunked_nll(h, k, targets, mask, chunk)[0]  # noqa: E731
        got, got_grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(hidden, kernel)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        _close(got_grads, want_grads, rtol=1e-5, atol=1e-6)
    assert float(loss_lib.chunked_nll(hidden, kernel, targets, mask, 5)[1]) == float(mask.sum())


_SLOW = pytest.mark.slow
_OPTIONS = [
    pytest.param("untied", dict(scan_layers=True, remat="layer", micro_batches=2, vocab_chunk=16),
                 marks=_SLOW),
    pytest.param("untied", dict(micro_batches=2), marks=_SLOW),
    pytest.param("tied", dict(scan_layers=True, vocab_chunk=8), marks=_SLOW),
    pytest.param("untied", dict(compute_dtype="bfloat16"), marks=_SLOW),
    pytest.param("untied", dict(scan_layers=True), marks=_SLOW),
    pytest.param("untied", dict(remat="layer"), marks=_SLOW),
    pytest.param("untied", dict(remat="dots"), marks=_SLOW),
    pytest.param("untied", dict(vocab_chunk=8), marks=_SLOW),
    pytest.param("untied", dict(micro_batches=4, scan_layers=True, remat="dots"), marks=_SLOW),
    pytest.param("tied", dict(micro_batches=2, remat="layer"), marks=_SLOW),
]


@functools.cache
def _loss_and_grads(name: str, step_config: step_lib.StepConfig):
    """Loss, tokens and gradients in the storage layout (the step's state layout is stacked
    with ``scan_layers``: parameters stacked on the way in, gradients unstacked on the way
    out)."""
    model_config = {"untied": CONFIG, "tied": TIED}[name]
    params = models.init_params(model_config, 0)
    if step_config.scan_layers:
        params = scan_lib.stack_layers(params)
    fn = jax.jit(lambda p, b: step_lib.loss_and_grads(model_config, step_config, p, b))
    loss, tokens, grads = fn(params, _batch())
    if step_config.scan_layers:
        grads = scan_lib.unstack_layers(grads)
    return loss, tokens, grads


@pytest.mark.parametrize("name, option", _OPTIONS, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={x}" for k, x in v.items()))
def test_step_options_equal_the_plain_step(name, option):
    loss, tokens, grads = _loss_and_grads(name, step_lib.StepConfig())
    assert float(tokens) == _batch()["loss_mask"][:, 1:].sum()
    got_loss, got_tokens, got_grads = _loss_and_grads(name, step_lib.StepConfig(**option))
    assert float(got_tokens) == float(tokens)
    assert jax.tree.structure(got_grads) == jax.tree.structure(grads)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(got_grads))
    if option.get("compute_dtype") == "bfloat16":  # 8 significant bits: close, not equal
        np.testing.assert_allclose(got_loss, loss, rtol=2e-2)
        assert float(got_loss) != float(loss)
        _close(got_grads, grads, rtol=0.2, atol=2e-3)
        return
    np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
    _close(got_grads, grads, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_moments():
    params = models.init_params(CONFIG, 0)
    batch = _batch()
    bf16_step = step_lib.StepConfig(compute_dtype="bfloat16")
    out, history = train_lib.train(
        CONFIG, params, _opt(4), iter(lambda: batch, None), steps=4, log_every=1,
        progress=False, step_config=bf16_step)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))
    # The moments of a state that went through the compiled bfloat16 step.
    mesh = train_lib.sharding.make_mesh(train_lib.sharding.default_mesh_config(),
                                        devices=jax.devices()[:1])
    compiled = step_lib.train_step(CONFIG, _opt(4), mesh, (8, 12), bf16_step)
    state = train_lib._fresh_state(compiled.layout, params, None, _opt(4))
    state, _ = compiled.step(state, jax.device_put(batch, compiled.batch_shardings))
    adam = state.opt_state[1]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((adam.mu, adam.nu)))
    _, plain = train_lib.train(CONFIG, params, _opt(4), iter(lambda: batch, None), steps=4,
                               log_every=1, progress=False)
    bf16, f32 = [r["loss"] for r in history], [r["loss"] for r in plain]
    np.testing.assert_allclose(bf16, f32, rtol=2e-2)
    assert bf16 != f32 and bf16[-1] < bf16[0]


def test_schedule_in_state_equals_learning_rate_schedule():
    for kind in ("cosine", "linear", "constant"):
        config = _opt(steps=7, lr=0.5, warmup=3, schedule=kind)
        config.final_lr_ratio = 0.1
        tx = optim.scale_by_schedule(kind, optim.schedule_numbers(config))
        state = tx.init(None)
        update = jax.jit(tx.update)
        schedule = optim.learning_rate_schedule(config)
        for step in range(10):
            out, state = update({"w": jnp.ones(2)}, state)
            np.testing.assert_allclose(out["w"], -float(schedule(step)), rtol=1e-6)
        assert int(state.count) == 10


@pytest.mark.slow  # several seconds of compilation: kept out of the fast tier
def test_one_executable_serves_stages_of_any_length_rate_and_mask():
    step_lib.clear_cache()
    params = models.init_params(CONFIG, 0)
    batch = _batch()
    batches = lambda: iter(lambda: batch, None)  # noqa: E731
    mesh = train_lib.sharding.make_mesh(train_lib.sharding.default_mesh_config(),
                                        devices=jax.devices()[:1])
    key_args = (CONFIG, _opt(), mesh, (8, 12))

    # A stage on a freshly built step, then stages of other lengths, peaks and warm-ups on the
    # same executable; the repeated stage gives the fresh run's bits.
    fresh, _ = train_lib.train(CONFIG, params, _opt(3, 3e-3, 2), batches(), steps=3,
                               progress=False)
    first, _ = train_lib.train(CONFIG, params, _opt(5, 1e-2, 0), batches(), steps=5,
                               progress=False)
    again, history = train_lib.train(CONFIG, params, _opt(3, 3e-3, 2), batches(), steps=3,
                                     log_every=1, progress=False)
    assert [r["learning_rate"] for r in history] == pytest.approx([0.0, 1.5e-3, 3e-3])
    jax.tree.map(np.testing.assert_array_equal, fresh, again)
    assert not np.array_equal(first["lm_head"]["kernel"], again["lm_head"]["kernel"])
    unfrozen = step_lib.train_step(*key_args)
    assert unfrozen.step._cache_size() == 1 and unfrozen.init._cache_size() == 1

    # Two different element-wise masks (and lengths, rates) share the frozen executable.
    rng = np.random.default_rng(0)
    masks = [jax.tree.map(lambda x: rng.random(x.shape) < 0.5, params) for _ in range(2)]
    frozen_runs = [train_lib.train(CONFIG, params, _opt(2 + i, 1e-2 / (i + 1)), batches(),
                                   steps=2 + i, frozen=mask, progress=False)[0]
                   for i, mask in enumerate(masks)]
    frozen = step_lib.train_step(*key_args, freeze_pattern=optim.freeze_pattern(masks[0]))
    assert frozen.step._cache_size() == 1 and frozen.init._cache_size() == 1
    # Two steps and their two state layouts.
    assert unfrozen.step._cache_size() == 1 and len(step_lib._CACHE) == 4
    for mask, out in zip(masks, frozen_runs):
        jax.tree.map(lambda p, o, m: np.testing.assert_array_equal(
            np.asarray(o)[m], np.asarray(p)[m]), params, out, mask)


def test_step_config_and_batch_errors():
    with pytest.raises(ValueError, match="'remat' must be one of"):
        step_lib.StepConfig(remat="all")
    with pytest.raises(ValueError, match="'micro_batches' must be an int >= 1"):
        step_lib.StepConfig(micro_batches=0)
    with pytest.raises(ValueError, match=r"unknown fields \['scan'\]"):
        step_lib.StepConfig.from_config({"scan": True})
    assert step_lib.StepConfig.from_config({"remat": "layer"}).remat == "layer"
    mesh = train_lib.sharding.make_mesh(train_lib.sharding.default_mesh_config())
    with pytest.raises(ValueError, match="batch of 12 rows: need a multiple of 16"):
        step_lib.batch_sharding(mesh, 12, micro_batches=2)
