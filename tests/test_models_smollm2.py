"""SmolLM2-135M-Instruct against transformers' torch model on the same converted directory.

Needs `python -m cpift_jax.models.smollm2 --fetch` to have run (CI runs it before pytest);
without it every model test *fails* with that command in the message, so a missing fetch can
never pass unnoticed. The model, tokenizer and torch reference are loaded once per module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpift_jax import models
from cpift_jax.models import smollm2

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def test_cache_dir_follows_env_and_missing_cache_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path))
    assert smollm2.cache_dir() == str(tmp_path / "smollm2")
    assert not smollm2.is_available()
    for load in (smollm2.load, smollm2.load_config_and_tokenizer):
        with pytest.raises(FileNotFoundError, match="python -m cpift_jax.models.smollm2 --fetch"):
            load()


@pytest.fixture(scope="module")
def smol():
    if not smollm2.is_available():
        pytest.fail(f"SmolLM2 is not fetched into {smollm2.hf_dir()!r}; run "
                    f"`{smollm2.FETCH_COMMAND}` first (CPIFT_CACHE picks the cache root)",
                    pytrace=False)
    return smollm2.load()


@pytest.fixture(scope="module")
def torch_ref(smol):
    import torch
    import transformers

    torch.set_num_threads(2)
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2.hf_dir()).eval()


@pytest.fixture(scope="module")
def chat_ids(smol):
    tokenizer = smol[2]
    text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    return tokenizer(text, return_tensors="np")["input_ids"]


@pytest.mark.slow
def test_smollm2_config_and_parameter_count(smol):
    config, params, _ = smol
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == \
        (9, 3, 49152)
    assert config.tie_word_embeddings and "lm_head" not in params
    assert 134e6 < sum(x.size for x in jax.tree.leaves(params)) < 136e6


@pytest.mark.slow
def test_config_and_tokenizer_without_the_weights_equal_load(smol):
    config, tokenizer = smollm2.load_config_and_tokenizer()
    assert config == smol[0]
    text = "The capital of France is Paris."
    assert tokenizer(text)["input_ids"] == smol[2](text)["input_ids"]


@pytest.mark.slow
def test_tokenizer_round_trip_and_special_tokens(smol):
    config, _, tokenizer = smol
    text = "Gravity bends light; 3.14159 ≈ π, naïve café.\n  Indented line."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    # The chat markers are single tokens and are the config's BOS/EOS ids.
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") == config.bos_token_id == 1
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2 and config.eos_token_ids == (2,)


@pytest.mark.slow
def test_logits_match_transformers(smol, torch_ref):
    import torch

    config, params, tokenizer = smol
    ids = tokenizer("Gravity is the force that", return_tensors="np")["input_ids"]
    ours = np.asarray(models.logits(config, params, jnp.asarray(ids)))
    with torch.no_grad():
        ref = torch_ref(torch.as_tensor(ids)).logits.numpy()
    assert ours.shape == ref.shape == (1, ids.shape[1], 49152)
    # float32 through 30 layers with |logits| ~ 20: summation order alone gives ~1e-4.
    assert np.abs(ours - ref).max() < 2e-3
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_greedy_chat_completion_matches_transformers_generate(smol, torch_ref, chat_ids):
    import torch

    config, params, tokenizer = smol
    new = np.asarray(models.generate(config, params, jnp.asarray(chat_ids),
                                     jnp.asarray([chat_ids.shape[1]]), 10,
                                     eos_id=config.eos_token_ids)[0])
    with torch.no_grad():
        ref = torch_ref.generate(torch.as_tensor(chat_ids), max_new_tokens=10, do_sample=False,
                                 eos_token_id=list(config.eos_token_ids),
                                 pad_token_id=config.pad_token_id)
    ref = ref[0, chat_ids.shape[1]:].numpy()
    # transformers stops after the EOS; ours pads the rest of the row with it.
    np.testing.assert_array_equal(new[:len(ref)], ref)
    assert (new[len(ref):] == config.eos_token_ids[0]).all()
    answer = tokenizer.decode(new, skip_special_tokens=True)
    assert "Paris" in answer, answer
