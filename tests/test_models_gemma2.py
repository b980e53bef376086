"""Gemma-2 as options of the decoder: config from/to HF, logits parity with transformers' torch
``Gemma2ForCausalLM`` (eager attention), export, KV-cache generation, the scanned training
forward and the sharding rules' coverage."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpift_jax import models, sharding, tree
from cpift_jax.models import hf
from cpift_jax.models import scan as scan_lib
from cpift_jax.models.layers import scale_embedding
from test_models_hf import torch_logits  # tests/ is on sys.path under pytest

WINDOW = 4
SEQ = 12  # longer than WINDOW, so the local layers see less than the global ones
# Three layers: local, global, local (transformers' default alternation). The caps are small
# enough to bite on random weights; query_pre_attn_scalar differs from head_dim (8).
HF_KWARGS = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 max_position_embeddings=64, sliding_window=WINDOW, query_pre_attn_scalar=12,
                 final_logit_softcapping=3.0, attn_logit_softcapping=2.0)
TOKENS = np.random.RandomState(0).randint(0, 96, size=(2, SEQ))

# Gemma-2-9B's config.json values (the public HF config), for the config-only tests.
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256000,
    "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "max_position_embeddings": 8192, "attention_bias": False, "bos_token_id": 2,
    "eos_token_id": 1, "pad_token_id": 0, "torch_dtype": "float32",
}


def _config(**changes):
    return models.ModelConfig.from_hf({"model_type": "gemma2", **HF_KWARGS, **changes},
                                      param_dtype="float32")


def _random_params(config, seed=0, std=0.2):
    """Every leaf random (norm gains too), so no option is hidden behind an identity."""
    leaves, treedef = jax.tree.flatten(models.abstract_params(config))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([std * jax.random.normal(k, x.shape, x.dtype)
                              for k, x in zip(keys, leaves)])


# ------------------------------------------------------------------------------ config


def test_from_hf_reads_every_gemma2_option():
    config = models.ModelConfig.from_hf(GEMMA2_9B)
    assert config.model_type == "gemma2" and config.hidden_act == "gelu_pytorch_tanh"
    assert config.sandwich_norms and config.norm_unit_offset and config.scale_embeddings
    assert config.tie_word_embeddings  # transformers' Gemma-2 default when the key is absent
    assert (config.final_logit_softcapping, config.attn_logit_softcapping) == (30.0, 50.0)
    assert config.attention_scale == 256 ** -0.5
    assert config.layer_windows[:4] == (4096, None, 4096, None)
    assert len(config.layer_windows) == 42
    assert models.ModelConfig.from_hf(config.to_hf_dict()) == config


def test_llama_family_keeps_every_gemma2_option_off():
    config = models.ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                                num_hidden_layers=2, num_attention_heads=2,
                                model_type="mistral", sliding_window=3)
    assert config.layer_windows == (3, 3)
    assert config.attention_scale == 4 ** -0.5
    assert not (config.sandwich_norms or config.norm_unit_offset or config.scale_embeddings)
    assert config.hidden_act == "silu" and config.final_logit_softcapping is None
    with pytest.raises(ValueError, match="HF mistral has no Gemma-2 options"):
        config.replace(final_logit_softcapping=30.0).to_hf_dict()


@pytest.mark.parametrize("change, message", [
    (dict(hidden_activation="relu"), "'hidden_activation' is 'relu'"),
    (dict(layer_types=["full_attention"] * 2), "layer_types has 2 entries, expected "
                                               "num_hidden_layers = 3"),
    (dict(layer_types=["local"] * 3), r"layer_types\[0\] is 'local'"),
    (dict(sliding_window=None), "sliding_attention layers but sliding_window is None"),
    (dict(use_bidirectional_attention=True), "'use_bidirectional_attention' is true"),
    (dict(attn_logit_softcapping=0.0), "attn_logit_softcapping must be > 0"),
])
def test_bad_gemma2_config_values_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        _config(**change)


def test_gemma2_model_type_needs_its_fixed_options():
    with pytest.raises(ValueError, match="model_type 'gemma2' needs sandwich_norms=True"):
        _config().replace(sandwich_norms=False)


def test_embedding_scale_is_rounded_to_the_compute_dtype():
    # sqrt(3584) = 59.866 is 59.75 in bfloat16; transformers multiplies by the rounded value.
    config = models.ModelConfig.from_hf(GEMMA2_9B)
    ones = jnp.ones((2,), jnp.bfloat16)
    assert scale_embedding(config, ones).tolist() == [59.75, 59.75]
    np.testing.assert_allclose(scale_embedding(config, ones.astype(jnp.float32)),
                               np.float32(np.sqrt(3584.0)), rtol=0)


# ------------------------------------------------------------------- structure and sharding


def test_params_have_the_hf_names_and_every_leaf_has_a_sharding_rule():
    config = _config()
    abstract = models.abstract_params(config)
    layer = abstract["model"]["layers"][1]
    assert sorted(layer) == ["input_layernorm", "mlp", "post_attention_layernorm",
                             "post_feedforward_layernorm", "pre_feedforward_layernorm",
                             "self_attn"]
    assert "lm_head" not in abstract  # tied
    names = {name for _, name, _, _ in hf._expected(config)}
    assert "model.layers.2.pre_feedforward_layernorm.weight" in names
    # Gemma's RMSNorm gain is 1 + weight: the weights start at zero.
    params = models.init_params(config, 0)
    assert not np.any(np.asarray(params["model"]["layers"][0]["post_feedforward_layernorm"]
                                 ["weight"]))
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    shardings = sharding.tree_shardings(abstract, sharding.LLAMA_RULES, mesh)
    flat = dict(zip(*tree.flatten(shardings)[:2]))
    assert flat["model/layers/0/pre_feedforward_layernorm/weight"].spec == \
        jax.sharding.PartitionSpec(None)
    assert flat["model/embed_tokens/embedding"].spec == \
        jax.sharding.PartitionSpec("tensor", "fsdp")


@pytest.mark.slow  # several seconds of compilation: kept out of the fast tier
def test_scanned_training_forward_equals_the_model_with_mixed_windows():
    config = _config()
    params = _random_params(config)
    tokens = jnp.asarray(TOKENS)
    expected = models.bind(config, params).hidden_states(tokens)[0]
    scanned = jax.jit(lambda p, t: scan_lib.hidden_states(config, p, t, scan=True,
                                                          remat="layer"))
    got = scanned(scan_lib.stack_layers(params), tokens)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The windows matter here: all-global layers give other hidden states.
    all_global = config.replace(layer_types=("full_attention",) * 3)
    other = scan_lib.hidden_states(all_global, scan_lib.stack_layers(params), tokens, scan=True)
    assert np.abs(np.asarray(other) - np.asarray(expected)).max() > 1e-2


# ------------------------------------------------------------ against transformers (torch)


def _torch_model(seed=0, **changes):
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.Gemma2Config(**{**HF_KWARGS, **changes})
    hf_config._attn_implementation = "eager"
    model = transformers.Gemma2ForCausalLM(hf_config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def _max_diff(ours, ref):
    ours = np.asarray(ours)
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    return float(np.abs(ours - ref).max())


@pytest.mark.slow
def test_load_matches_transformers_gemma2_logits(tmp_path):
    model = _torch_model()
    model.save_pretrained(tmp_path)
    config, params = hf.load(tmp_path)
    assert config.model_type == "gemma2" and config.layer_windows == (WINDOW, None, WINDOW)
    ref = torch_logits(model, TOKENS)
    # Same tolerance as the other architectures (tests/test_models_hf.py).
    assert _max_diff(models.logits(config, params, jnp.asarray(TOKENS)), ref) <= 1e-4
    # Final soft-capping is active: every logit is within the cap, some close to it.
    assert np.abs(ref).max() < 3.0 and np.abs(ref).max() > 2.0
    # Each Gemma-2 option changes the logits, so the parity above checks all of them.
    for change in (dict(layer_types=("full_attention",) * 3), dict(attn_logit_softcapping=None),
                   dict(query_pre_attn_scalar=8), dict(scale_embeddings=False, model_type="llama",
                                                         hidden_act="gelu_pytorch_tanh",
                                                         sandwich_norms=True,
                                                         norm_unit_offset=True)):
        changed = models.logits(config.replace(**change), params, jnp.asarray(TOKENS))
        assert np.abs(np.asarray(changed) - ref).max() > 1e-3, change


@pytest.mark.slow
def test_save_then_transformers_from_pretrained_round_trips(tmp_path):
    import transformers

    _torch_model(seed=1).save_pretrained(tmp_path / "src")
    config, params = hf.load(tmp_path / "src")
    hf.save(tmp_path / "out", config, params)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["Gemma2ForCausalLM"]
    assert written["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                                 attn_implementation="eager")
    assert type(reloaded).__name__ == "Gemma2ForCausalLM"
    assert _max_diff(models.logits(config, params, jnp.asarray(TOKENS)),
                     torch_logits(reloaded.eval(), TOKENS)) <= 1e-4
    again_config, again = hf.load(tmp_path / "out")
    assert again_config == config
    jax.tree.map(np.testing.assert_array_equal, again, params)


@pytest.mark.slow
def test_kv_cache_generation_equals_uncached_past_the_window():
    config = _config()
    params = _random_params(config, seed=3, std=0.5)
    # Right-padded prompts of lengths 7 and 3, 8 new tokens: positions run past the window.
    prompts = jnp.asarray(TOKENS[:, :7])
    lengths = jnp.array([7, 3])
    cached = models.generate(config, params, prompts, lengths, 8)
    plain = models.generate_without_cache(config, params, prompts, lengths, 8)
    np.testing.assert_array_equal(cached, plain)
    # Greedy decoding of a random tied model repeats a token; sampling (same key on both
    # paths) visits many tokens, so every cache slot and both window kinds are exercised.
    sample = dict(temperature=1.0, rng=jax.random.key(7))
    cached = models.generate(config, params, prompts, lengths, 8, **sample)
    plain = models.generate_without_cache(config, params, prompts, lengths, 8, **sample)
    np.testing.assert_array_equal(cached, plain)
    assert len(set(np.asarray(cached).ravel().tolist())) > 6
