"""Held-out loss and bits per byte: by hand on a uniform model, against a float64 NumPy
reference, and through a chat template's assistant-only masks."""

import math

import jax
import numpy as np
import pytest

from cpift_jax import models
from cpift_jax.data import chat
from cpift_jax.data.readers import Record
from cpift_jax.data.tokenizer import CharTokenizer
from cpift_jax.evals import heldout
from test_evals_math import random_params

TOK = CharTokenizer()
CONFIG = models.ModelConfig(vocab_size=TOK.vocab_size, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=128)


def pair(rid, user, reply):
    return Record(rid, [{"role": "user", "content": user},
                        {"role": "assistant", "content": reply}])


RECORDS = [pair("a", "2+2?", "42"), pair("b", "name?", "7")]


def test_uniform_model_by_hand():
    # All-zero parameters give all-zero logits: every token costs ln V nats. The supervised
    # tokens are each reply's characters and its EOS: 3 + 2 = 5 tokens for 2 + 1 = 3 bytes.
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), models.abstract_params(CONFIG))
    result = heldout.evaluate(CONFIG, zeros, TOK, RECORDS, seq_len=32, batch_size=2)
    ln_v = math.log(TOK.vocab_size)
    assert result.total_tokens == 5 and result.total_bytes == 3
    assert result.tokens == [3, 2] and result.bytes == [2, 1]
    assert result.loss == pytest.approx(ln_v, rel=1e-6)
    assert result.bits_per_byte == pytest.approx(5 * ln_v / math.log(2) / 3, rel=1e-6)
    np.testing.assert_allclose(result.nll, [3 * ln_v, 2 * ln_v], rtol=1e-6)


def test_random_model_matches_a_float64_reference():
    params = random_params(CONFIG, 0)
    result = heldout.evaluate(CONFIG, params, TOK, RECORDS, seq_len=32, batch_size=2)
    arrays = heldout.encode_references(TOK, RECORDS, 32)
    tokens, mask = arrays["tokens"], arrays["loss_mask"]
    logits = np.asarray(models.logits(CONFIG, params, tokens), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0] * mask[:, 1:]
    np.testing.assert_allclose(result.nll, nll.sum(1), rtol=1e-5)
    assert result.loss == pytest.approx(nll.sum() / mask.sum(), rel=1e-5)
    assert result.bits_per_byte == pytest.approx(nll.sum() / math.log(2) / 3, rel=1e-5)


@pytest.mark.slow
def test_vocabulary_chunks_give_the_same_nll():
    params = random_params(CONFIG, 1)
    full = heldout.evaluate(CONFIG, params, TOK, RECORDS, seq_len=32, batch_size=2)
    chunked = heldout.evaluate(CONFIG, params, TOK, RECORDS, seq_len=32, batch_size=2,
                               vocab_chunk=7)  # 100 columns: 15 chunks, the last overlapping
    np.testing.assert_allclose(chunked.nll, full.nll, rtol=1e-5)


def test_bytes_are_utf8_and_errors_name_the_record():
    assert heldout.reference_bytes(pair("u", "q", "héllo")) == 6
    with pytest.raises(ValueError, match="record 'long': example 0 .* needs 44 tokens"):
        heldout.evaluate(CONFIG, None, TOK, [pair("long", "x" * 40, "y")], seq_len=32)
    multi = Record("m", RECORDS[0].messages * 2)
    with pytest.raises(ValueError, match="record 'm': a tokenizer without a chat template"):
        heldout.evaluate(CONFIG, None, TOK, [multi], seq_len=32)


def test_chat_template_masks_every_assistant_turn():
    from test_data_chat import TWO_TURNS, char_tokenizer

    hf = char_tokenizer()
    assert len(hf) == CONFIG.vocab_size  # 96 characters, <pad>, <unk> and the two chat markers
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), models.abstract_params(CONFIG))
    record = Record("chat", TWO_TURNS)
    result = heldout.evaluate(CONFIG, zeros, hf, [record], seq_len=96)
    _, mask = chat.encode_chat(hf, TWO_TURNS, 96)
    # "yo<|im_end|>" and "4<|im_end|>": 5 tokens; the replies "yo" and "4": 3 bytes.
    assert result.total_tokens == mask.sum() == 5 and result.total_bytes == 3
    assert result.bits_per_byte == pytest.approx(5 * math.log(len(hf)) / math.log(2) / 3,
                                                 rel=1e-6)
