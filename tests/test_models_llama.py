"""ModelConfig, the parameter layout, the NNX module and the functional forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from cpift_jax import models, tree
from cpift_jax.models.layers import RMSNorm, attention_mask, causal_attention, rope_inv_freq

TINY = models.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


# ----------------------------------------------------------------------------- config


def test_config_resolves_defaults_and_is_a_static_arg():
    c = models.ModelConfig(vocab_size=10, hidden_size=12, intermediate_size=8,
                           num_hidden_layers=1, num_attention_heads=3)
    assert (c.head_dim, c.num_key_value_heads) == (4, 3)
    assert hash(c) == hash(c.replace())
    assert c.replace(eos_token_id=[1, 2]).eos_token_ids == (1, 2)
    f = jax.jit(lambda config, x: x * config.hidden_size, static_argnums=0)
    assert f(c, 2) == 24


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), "supported: ['llama', 'mistral', 'qwen2', 'gemma2']"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(param_dtype="float16"), "param_dtype"),
    (dict(rope_type="yarn"), "rope_type 'yarn'"),
    (dict(rope_type="llama3"), "rope_original_max_position_embeddings"),
])
def test_config_rejects_bad_values(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TINY.replace(**change)


@pytest.mark.parametrize("config", [
    TINY,
    TINY.replace(tie_word_embeddings=True, attention_bias=True, attention_out_bias=True,
                 mlp_bias=True, rope_type="llama3", rope_factor=8.0,
                 rope_original_max_position_embeddings=64, eos_token_id=(2, 3)),
    TINY.replace(model_type="mistral", sliding_window=7, param_dtype="bfloat16"),
    TINY.replace(model_type="qwen2", attention_bias=True, rope_type="linear", rope_factor=2.0),
])
def test_config_hf_dict_round_trip(config):
    assert models.ModelConfig.from_hf(config.to_hf_dict()) == config
    # ... and through the transformers config class itself.
    hf = transformers.AutoConfig.for_model(**config.to_hf_dict())
    assert models.ModelConfig.from_hf(hf, param_dtype=config.param_dtype) == config


def test_config_from_hf_reads_legacy_rope_scaling_and_family_biases():
    c = models.ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 4,
        "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 4.0}, "attention_bias": True,
        "torch_dtype": "bfloat16",
    })
    assert (c.rope_type, c.rope_theta, c.rope_factor) == ("linear", 500000.0, 4.0)
    assert (c.attention_bias, c.attention_out_bias, c.param_dtype) == (True, True, "bfloat16")
    q = models.ModelConfig.from_hf(transformers.Qwen2Config(
        vocab_size=10, hidden_size=8, intermediate_size=4, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2))
    assert (q.attention_bias, q.attention_out_bias, q.sliding_window) == (True, False, None)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"},
     r"unsupported model_type 'gpt2'.*\['llama', 'mistral', 'qwen2', 'gemma2'\]"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"hidden_size": None}, "hidden_size"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
])
def test_config_from_hf_rejects_unsupported(change, message):
    d = TINY.to_hf_dict()
    d.update(change)
    with pytest.raises(ValueError, match=message):
        models.ModelConfig.from_hf(d)


# ----------------------------------------------------------------------------- layers


def test_rope_inv_freq_default_linear_llama3():
    c = TINY.replace(head_dim=6, rope_theta=1000.0)
    np.testing.assert_allclose(rope_inv_freq(c), [1.0, 0.1, 0.01], rtol=1e-6)
    np.testing.assert_allclose(rope_inv_freq(c.replace(rope_type="linear", rope_factor=2.0)),
                               [0.5, 0.05, 0.005], rtol=1e-6)
    llama3 = c.replace(rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                       rope_high_freq_factor=4.0, rope_original_max_position_embeddings=100)
    # wavelengths 2pi/f = 6.3 (< 100/4: kept), 62.8 (between: smoothed), 628 (> 100: f / 8);
    # smooth = (100 / 62.83 - 1) / 3 = 0.19718, f' = 0.1 * ((1 - smooth) / 8 + smooth).
    np.testing.assert_allclose(rope_inv_freq(llama3), [1.0, 0.02975352, 0.00125], rtol=1e-5)


def test_rms_norm_literal():
    norm = RMSNorm(2, 0.0, param_dtype=jnp.float32)
    norm.weight[...] = jnp.array([1.0, 2.0])
    # mean(x^2) = 12.5, 1/sqrt(12.5) = 0.2828427
    np.testing.assert_allclose(norm(jnp.array([[3.0, 4.0]])), [[0.8485281, 2.2627417]], rtol=1e-6)


def test_attention_mask_causal_and_sliding_window():
    q = jnp.array([[2, 3]])
    k = jnp.arange(5)[None]
    np.testing.assert_array_equal(attention_mask(q, k, None)[0, 0],
                                  [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(attention_mask(q, k, 2)[0, 0],
                                  [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]])


# ----------------------------------------------------------------------------- params & forward


# Grouped-query attention in the fast tier; plain multi-head and multi-query in the full suite.
@pytest.mark.parametrize("heads, kv_heads", [pytest.param(4, 4, marks=pytest.mark.slow), (4, 2),
                                             pytest.param(6, 1, marks=pytest.mark.slow)])
def test_causal_attention_equals_the_reference_attention(heads, kv_heads):
    # NumPy draws: an eager jax.random.normal compiles a program per shape (about a second).
    rng = np.random.default_rng(heads * 10 + kv_heads)
    q = jnp.asarray(rng.standard_normal((2, 7, heads, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 7, kv_heads, 8)), jnp.float32) for _ in range(2))
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(causal_attention(q, k, v), expected, rtol=1e-5, atol=1e-6)
    # bfloat16 inputs: float32 scores and softmax, result in bfloat16.
    out = causal_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=5e-2)


def test_param_layout_is_hf_like():
    c = TINY.replace(num_hidden_layers=1, attention_bias=True)
    paths, leaves, _ = tree.flatten(models.abstract_params(c))
    flat = {path: tuple(leaf.shape) for path, leaf in zip(paths, leaves)}
    assert flat == {
        "lm_head/kernel": (16, 64),
        "model/embed_tokens/embedding": (64, 16),
        "model/layers/0/input_layernorm/weight": (16,),
        "model/layers/0/post_attention_layernorm/weight": (16,),
        "model/layers/0/self_attn/q_proj/kernel": (16, 16),
        "model/layers/0/self_attn/q_proj/bias": (16,),
        "model/layers/0/self_attn/k_proj/kernel": (16, 8),
        "model/layers/0/self_attn/k_proj/bias": (8,),
        "model/layers/0/self_attn/v_proj/kernel": (16, 8),
        "model/layers/0/self_attn/v_proj/bias": (8,),
        "model/layers/0/self_attn/o_proj/kernel": (16, 16),
        "model/layers/0/mlp/gate_proj/kernel": (16, 24),
        "model/layers/0/mlp/up_proj/kernel": (16, 24),
        "model/layers/0/mlp/down_proj/kernel": (24, 16),
        "model/norm/weight": (16,),
    }
    assert "lm_head/kernel" not in tree.leaf_paths(
        models.abstract_params(c.replace(tie_word_embeddings=True)))


@pytest.mark.slow
def test_init_params_is_a_plain_dict_deterministic_per_seed_in_param_dtype():
    a, b = models.init_params(TINY, 0), models.init_params(TINY, 0)
    assert type(a) is dict and type(a["model"]["layers"]) is dict
    jax.tree.map(np.testing.assert_array_equal, a, b)
    c = models.init_params(TINY, 1)
    assert not np.array_equal(a["lm_head"]["kernel"], c["lm_head"]["kernel"])
    np.testing.assert_array_equal(a["model"]["norm"]["weight"], np.ones(16))
    bf16 = models.init_params(TINY.replace(param_dtype="bfloat16"), 0)
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.slow
def test_module_and_functional_logits_agree():
    model = models.LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, params, models.init_params(TINY, 0))
    tokens = jnp.array([[1, 5, 9, 63, 0]])
    out = models.logits(TINY, params, tokens)
    assert out.shape == (1, 5, 64) and out.dtype == jnp.float32
    np.testing.assert_allclose(model(tokens), out, atol=1e-6)


def test_bf16_logits_are_float32_and_close_to_float32_model():
    params = models.init_params(TINY, 0)
    tokens = jnp.array([[3, 1, 4, 1, 5, 9]])
    ref = models.logits(TINY, params, tokens)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = models.logits(TINY.replace(param_dtype="bfloat16"), bf16, tokens)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.05)


def test_bind_names_a_leaf_with_the_wrong_shape():
    params = models.init_params(TINY, 0)
    params["model"]["layers"][1]["mlp"]["up_proj"]["kernel"] = jnp.zeros((16, 25))
    with pytest.raises(ValueError, match="model/layers/1/mlp/up_proj/kernel.*25"):
        models.logits(TINY, params, jnp.zeros((1, 3), jnp.int32))


_PARAMS = models.init_params(TINY, 3)


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(0, 63), min_size=8, max_size=8),
       st.lists(st.integers(0, 63), min_size=8, max_size=8), st.integers(0, 7))
def test_logits_are_causal(tokens, other, cut):
    """Logits up to position `cut` do not depend on tokens after it."""
    a = jnp.array([tokens])
    b = jnp.array([tokens[: cut + 1] + other[cut + 1:]])
    la, lb = models.logits(TINY, _PARAMS, a), models.logits(TINY, _PARAMS, b)
    np.testing.assert_allclose(la[:, : cut + 1], lb[:, : cut + 1], atol=1e-6)


@pytest.mark.slow
@settings(max_examples=5, deadline=None)
@given(st.lists(st.integers(0, 63), min_size=6, max_size=6), st.integers(1, 500))
def test_rope_attention_depends_only_on_relative_positions(tokens, offset):
    model = models.bind(TINY, _PARAMS)
    t = jnp.array([tokens])
    pos = jnp.arange(6)[None]
    np.testing.assert_allclose(model(t, pos + offset), model(t, pos), atol=2e-5)
