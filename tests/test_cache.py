"""Caches under one root (``cpift_jax.cache``) and the toy base's content-keyed cache."""

from pathlib import Path

import jax
import numpy as np
import pytest

import cpift_jax
from cpift_jax import cache, models
from cpift_jax.data import suite
from cpift_jax.data.tokenizer import CharTokenizer
from cpift_jax.models import smollm2
from cpift_jax.training import pretrain

TASKS = ("arith", "logic")
TOK = CharTokenizer(TASKS)
MODEL = models.ModelConfig(vocab_size=TOK.vocab_size, hidden_size=8, intermediate_size=16,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=16)


def _suite_config():
    config = suite.default_config()
    config.tasks = TASKS
    return config


def _pretrain_config():
    config = pretrain.default_config()
    config.steps, config.batch_size, config.seq_len = 2, 2, 16
    config.optimizer.warmup_steps = 1
    return config


def test_root_follows_the_environment_and_defaults_to_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path))
    assert cache.cache_root() == tmp_path
    assert smollm2.cache_dir() == str(tmp_path / "smollm2")
    monkeypatch.delenv(cache.ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "cpift_jax"


def test_tests_run_with_a_temporary_cache_root(temporary_cache):
    assert cache.cache_root() == temporary_cache
    assert not str(temporary_cache).startswith(str(Path.home() / ".cache"))


def test_toy_base_key_changes_with_the_corpus_and_the_version(monkeypatch):
    config = _pretrain_config()
    arrays = pretrain.corpus_arrays(TOK, _suite_config(), config)

    def key(rows):
        return pretrain.cache_key(pretrain.settings(MODEL, TOK, _suite_config(), config, rows))

    same = key(arrays)
    assert key({k: v.copy() for k, v in arrays.items()}) == same  # content, not identity
    edited = {k: v.copy() for k, v in arrays.items()}
    edited["tokens"][5, 3] = (edited["tokens"][5, 3] + 1) % TOK.vocab_size  # one token differs
    assert key(edited) != same
    monkeypatch.setattr(cpift_jax, "__version__", cpift_jax.__version__ + ".post1")
    assert key(arrays) != same
    meta = pretrain.settings(MODEL, TOK, _suite_config(), config, arrays)
    assert meta["versions"] == {"cpift_jax": cpift_jax.__version__, "jax": jax.__version__}


@pytest.mark.slow  # pretrains (and compiles) a tiny base
def test_cached_base_lives_under_the_root_in_its_key_directory(temporary_cache):
    config = _pretrain_config()
    first = pretrain.cached_base(MODEL, TOK, _suite_config(), config, progress=False)
    arrays = pretrain.corpus_arrays(TOK, _suite_config(), config)
    key = pretrain.cache_key(pretrain.settings(MODEL, TOK, _suite_config(), config, arrays))
    directory = temporary_cache / "toy_base" / key
    assert (directory / "base_params.npz").is_file()
    stored = pretrain.load_npz(directory / "base_params.npz", first)
    jax.tree.map(np.testing.assert_array_equal, first, stored)
    again = pretrain.cached_base(MODEL, TOK, _suite_config(), config, progress=False)
    jax.tree.map(np.testing.assert_array_equal, first, again)
