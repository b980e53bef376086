"""KV-cache generation: identical tokens to cache-free generation, per-row lengths, EOS.

Each generation test compiles the prefill and the decode loop for its config (seconds each), so
they are ``slow``: the fast tier keeps the argument checks (test_train evaluates with generate)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpift_jax import models

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "llama_gqa": models.ModelConfig(**BASE),
    "qwen2_tied": models.ModelConfig(**BASE, model_type="qwen2", attention_bias=True,
                                     tie_word_embeddings=True),
    # Window 3 < prompt + generated length: the cache path must apply the window too.
    "mistral_window": models.ModelConfig(**BASE, model_type="mistral", sliding_window=3),
}
# Right-padded prompts with per-row lengths 5, 2, 4 (pad values are arbitrary on purpose).
PROMPTS = jnp.array([[5, 9, 2, 33, 7], [11, 3, 60, 60, 60], [1, 2, 3, 4, 0]])
LENGTHS = jnp.array([5, 2, 4])


def _params(config):
    # Larger-than-default weights give peaked, tie-free logits, so greedy is well defined.
    return jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, models.init_params(config, 0))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cache_gives_exactly_the_tokens_of_no_cache_greedy(name):
    config = CONFIGS[name]
    params = _params(config)
    cached = models.generate(config, params, PROMPTS, LENGTHS, 8)
    plain = models.generate_without_cache(config, params, PROMPTS, LENGTHS, 8)
    assert cached.shape == (3, 8) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(cached, plain)
    # The first new token is the argmax of the forward logits at the last prompt position.
    logits = models.logits(config, params, PROMPTS)
    np.testing.assert_array_equal(cached[:, 0], jnp.argmax(logits[jnp.arange(3), LENGTHS - 1], -1))


@pytest.mark.slow
def test_cache_gives_exactly_the_tokens_of_no_cache_sampled():
    config = CONFIGS["llama_gqa"]
    params = models.init_params(config, 1)  # small weights: flat distributions, real sampling
    kw = dict(temperature=0.8, top_k=20, rng=jax.random.key(7))
    cached = models.generate(config, params, PROMPTS, LENGTHS, 8, **kw)
    np.testing.assert_array_equal(
        cached, models.generate_without_cache(config, params, PROMPTS, LENGTHS, 8, **kw))
    other = models.generate(config, params, PROMPTS, LENGTHS, 8, **{**kw, "rng": jax.random.key(8)})
    assert not np.array_equal(cached, other)
    greedy = models.generate(config, params, PROMPTS, LENGTHS, 8)
    assert not np.array_equal(cached, greedy)


@pytest.mark.slow
def test_each_row_is_generated_as_if_alone():
    config = CONFIGS["mistral_window"]
    params = _params(config)
    batch = models.generate(config, params, PROMPTS, LENGTHS, 6)
    for row in range(3):
        n = int(LENGTHS[row])
        alone = models.generate(config, params, PROMPTS[row:row + 1, :n], LENGTHS[row:row + 1], 6)
        np.testing.assert_array_equal(batch[row], alone[0])


@pytest.mark.slow
def test_eos_stops_a_row_and_fills_the_rest():
    config = CONFIGS["llama_gqa"]
    params = _params(config)
    free = np.asarray(models.generate(config, params, PROMPTS, LENGTHS, 8))
    eos = int(free[0, 2])  # row 0 emits this at step 2
    stopped = np.asarray(models.generate(config, params, PROMPTS, LENGTHS, 8, eos_id=eos))
    for row in range(3):
        hits = np.flatnonzero(free[row] == eos)
        end = hits[0] + 1 if hits.size else 8
        np.testing.assert_array_equal(stopped[row, :end], free[row, :end])
        assert (stopped[row, end:] == eos).all()
    assert (stopped[0, 3:] == eos).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_lengths=jnp.array([5, 0, 4])), r"prompt_lengths must lie in \[1, 5\]"),
    (dict(prompt_lengths=jnp.array([5, 6, 4])), r"prompt_lengths must lie in \[1, 5\]"),
    (dict(prompt_lengths=jnp.array([5, 2])), "prompt_lengths must have shape"),
    (dict(prompts=jnp.zeros((3, 5))), "prompts must be an int array"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=1.0), "needs an rng"),
    (dict(temperature=1.0, rng=jax.random.key(0), top_k=65), "top_k"),
])
def test_bad_arguments_are_reported(kwargs, message):
    args = dict(prompts=PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=4)
    args.update(kwargs)
    config = CONFIGS["llama_gqa"]
    with pytest.raises(ValueError, match=message):
        models.generate(config, None, **args)
