"""SmolLM2-135M-Instruct: runs only when `python -m cpift_jax.models.smollm2 --fetch` has run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpift_jax import models
from cpift_jax.models import smollm2


def test_cache_dir_follows_env_and_missing_cache_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CPIFT_CACHE", str(tmp_path))
    assert smollm2.cache_dir() == str(tmp_path / "smollm2")
    assert not smollm2.is_available()
    with pytest.raises(FileNotFoundError, match="python -m cpift_jax.models.smollm2 --fetch"):
        smollm2.load()


needs_model = pytest.mark.skipif(
    not smollm2.is_available(),
    reason=f"SmolLM2 not fetched; run `{smollm2.FETCH_COMMAND}`",
)


@pytest.fixture(scope="module")
def smol():
    return smollm2.load()


@needs_model
def test_smollm2_config_and_greedy_completion(smol):
    config, params, tokenizer = smol
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert config.tie_word_embeddings and "lm_head" not in params
    assert 134e6 < sum(x.size for x in jax.tree.leaves(params)) < 136e6
    ids = tokenizer("The capital of France is", return_tensors="np")["input_ids"]
    new = models.generate(config, params, jnp.asarray(ids), jnp.asarray([ids.shape[1]]), 6,
                          eos_id=config.eos_token_ids)
    assert "Paris" in tokenizer.decode(np.asarray(new[0]))


@needs_model
def test_smollm2_logits_match_transformers_on_the_converted_dir(smol):
    import torch
    import transformers

    config, params, tokenizer = smol
    ids = tokenizer("Gravity is the force that", return_tensors="np")["input_ids"]
    ours = np.asarray(models.logits(config, params, jnp.asarray(ids)))
    assert np.isfinite(ours).all()
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2.hf_dir())
    with torch.no_grad():
        ref = ref_model(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() < 2e-3  # float32 over 30 layers, |logits| ~ 30
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
