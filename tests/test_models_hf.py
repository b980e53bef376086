"""Hugging Face import/export against transformers' torch models (the numerical reference)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from cpift_jax import models
from cpift_jax.models import hf

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **COMMON, attention_bias=True, mlp_bias=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16)),
    "llama_tied": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    # A window shorter than the sequence, so the sliding mask matters.
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=4),
}
TOKENS = np.random.RandomState(0).randint(0, 96, size=(2, 12))


def torch_model(name, seed=0):
    """A transformers model with every parameter random (norms and biases too)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[name]())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def torch_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def assert_logits_match(ours, ref):
    ours = np.asarray(ours)
    assert np.abs(ours - ref).max() <= 1e-4
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_load_matches_transformers_logits(name, tmp_path):
    model = torch_model(name)
    model.save_pretrained(tmp_path)
    config, params = hf.load(tmp_path)
    assert config.model_type == name.split("_")[0]
    assert config.tie_word_embeddings == (name == "llama_tied")
    attn = params["model"]["layers"][0]["self_attn"]
    qkv_bias, o_bias = {"llama": (True, True), "qwen2": (True, False)}.get(name, (False, False))
    assert [("bias" in attn[p]) for p in ("q_proj", "k_proj", "v_proj", "o_proj")] == \
        [qkv_bias] * 3 + [o_bias]
    assert_logits_match(models.logits(config, params, jnp.asarray(TOKENS)), torch_logits(model))


@pytest.mark.slow
def test_load_reads_a_checkpoint_sharded_by_transformers(tmp_path):
    model = torch_model("qwen2")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / hf.INDEX_FILE).exists() and not (tmp_path / hf.SINGLE_FILE).exists()
    config, params = hf.load(tmp_path)
    assert_logits_match(models.logits(config, params, jnp.asarray(TOKENS)), torch_logits(model))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2", "mistral"])
def test_save_then_transformers_from_pretrained_round_trips(name, tmp_path):
    config, params = hf.load(_saved(name, tmp_path / "src"))
    hf.save(tmp_path / "out", config, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == type(torch_model(name)).__name__
    assert_logits_match(models.logits(config, params, jnp.asarray(TOKENS)),
                        torch_logits(reloaded))


@pytest.mark.slow
def test_sharded_save_loads_in_transformers_and_back_bit_exact(tmp_path):
    config, params = hf.load(_saved("llama", tmp_path / "src"))
    hf.save(tmp_path / "out", config, params, max_shard_bytes=20_000)
    files = sorted(os.listdir(tmp_path / "out"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and hf.INDEX_FILE in files and hf.SINGLE_FILE not in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    _, again = hf.load(tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, again, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert_logits_match(models.logits(config, params, jnp.asarray(TOKENS)),
                        torch_logits(reloaded))
    # Saving again unsharded replaces the old shards instead of leaving them behind.
    hf.save(tmp_path / "out", config, params)
    assert [f for f in os.listdir(tmp_path / "out") if "safetensors" in f] == [hf.SINGLE_FILE]


@pytest.mark.slow
def test_bf16_params_round_trip_bit_exact(tmp_path):
    config = models.ModelConfig(**COMMON, param_dtype="bfloat16")
    params = models.init_params(config, 0)
    hf.save(tmp_path, config, params)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded_config, loaded = hf.load(tmp_path)
    assert loaded_config == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 loaded, params)
    # transformers reads it back as bf16 with the same bits.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.bfloat16
    embed = reloaded.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(embed, np.asarray(params["model"]["embed_tokens"]["embedding"],
                                                    np.float32))
    # param_dtype override: a bf16 checkpoint loaded as float32.
    c32, p32 = hf.load(tmp_path, param_dtype="float32")
    assert c32.param_dtype == "float32"
    assert {x.dtype for x in jax.tree.leaves(p32)} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
def test_bf16_transformers_checkpoint_loads_as_bf16_params_by_config(tmp_path):
    model = torch_model("mistral").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    config, params = hf.load(tmp_path)
    assert config.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    ref = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(
        np.asarray(params["model"]["layers"][1]["mlp"]["down_proj"]["kernel"], np.float32), ref.T)
    ours = np.asarray(models.logits(config, params, jnp.asarray(TOKENS)))
    assert ours.dtype == np.float32
    # bf16 arithmetic on both sides (different rounding order): compare loosely.
    with torch.no_grad():
        ref_logits = model(torch.as_tensor(TOKENS)).logits.float().numpy()
    assert np.abs(ours - ref_logits).max() <= 0.1 * np.abs(ref_logits).max()


# ----------------------------------------------------------------------------- bad input


def _saved(name, path):
    torch_model(name).save_pretrained(path)
    return path


def _rewrite_weights(path, edit):
    tensors = load_file(path / hf.SINGLE_FILE)
    edit(tensors)
    save_file(tensors, path / hf.SINGLE_FILE, metadata={"format": "pt"})


@pytest.mark.slow
def test_unknown_model_type_lists_supported(tmp_path):
    path = _saved("llama_tied", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'gpt_neox'.*\['llama', 'mistral', 'qwen2', 'gemma2'\]"):
        hf.load(path)


@pytest.mark.slow  # several seconds of compilation: kept out of the fast tier
def test_missing_tensor_is_named(tmp_path):
    path = _saved("llama_tied", tmp_path)
    _rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        hf.load(path)


def test_shape_mismatch_names_tensor_expected_and_found(tmp_path):
    path = _saved("llama_tied", tmp_path)

    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)

    _rewrite_weights(path, edit)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape "
                                         r"\(8, 32\), expected \(16, 32\)"):
        hf.load(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = _saved("llama_tied", tmp_path)
    _rewrite_weights(path, lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.extra\.weight'"):
        hf.load(path)


def test_pickled_bin_checkpoint_is_refused(tmp_path):
    model = torch_model("llama_tied")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*refusing to unpickle"):
        hf.load(tmp_path)


def test_missing_config_and_weights_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(models.ModelConfig(**COMMON).to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        hf.load(tmp_path)
