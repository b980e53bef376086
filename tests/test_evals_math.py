"""Math evaluation: final-number extraction, exact match with oracle generators, and the real
batched KV-cache generation against an unbatched reference decode."""

import jax
import numpy as np
import pytest

from cpift_jax import models, sharding
from cpift_jax.data.readers import Record
from cpift_jax.data.tokenizer import CharTokenizer
from cpift_jax.evals import math as math_eval

TOK = CharTokenizer()
CONFIG = models.ModelConfig(vocab_size=TOK.vocab_size, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=128)


def random_params(config, seed, scale=0.3):
    """Random float32 parameters of ``config``'s layout, drawn in NumPy: an eager
    ``models.init_params`` of even a tiny model costs seconds of op dispatch."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (scale * rng.standard_normal(a.shape)).astype(np.float32),
                        models.abstract_params(config))


def problem(rid, question, answer):
    return Record(rid, [{"role": "user", "content": question},
                        {"role": "assistant", "content": f"work\n#### {answer}"}],
                  {"answer": answer})


RECORDS = [problem("a", "2+3?", "5"), problem("b", "10*120?", "1200"),
           problem("c", "half of 5?", "2.5")]


def oracle(replies, tokenizer=TOK, decode=None):
    """A generate_fn that answers each prompt with ``replies[prompt text]``."""
    decode = decode or tokenizer.decode

    def generate_fn(config, params, prompts, lengths, max_new_tokens, *, eos_id):
        out = np.full((len(prompts), max_new_tokens), eos_id[0], np.int32)
        for b, (row, n) in enumerate(zip(np.asarray(prompts), np.asarray(lengths))):
            ids = list(tokenizer.encode(replies[decode(row[:n])]))[:max_new_tokens]
            out[b, : len(ids)] = ids
        return out

    return generate_fn


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("#### -0012.500", "-12.5"),
    ("The answer is 12.0.", "12"),
    ("first 3 then 8 apples", "8"),
    ("#### 5 (not 6)", "5"),
    ("-0.0", "0"),
    ("no digits here", None),
])
def test_extract_answer(text, expected):
    assert math_eval.extract_answer(text) == expected


def test_normalize_number_rejects_non_numbers():
    with pytest.raises(ValueError, match="not a decimal number: '12a'"):
        math_eval.normalize_number("12a")


def test_exact_match_with_oracles():
    params = None  # the oracles never read the parameters
    right = {"2+3?": "2+3=5\n#### 5", "10*120?": "It is 1,200.", "half of 5?": "#### 2.50"}
    result = math_eval.evaluate(CONFIG, params, TOK, RECORDS, max_new_tokens=24, batch_size=2,
                                generate_fn=oracle(right))
    assert result.score == 1.0 and result.correct == [True, True, True]
    assert result.predictions == [right["2+3?"], right["10*120?"], right["half of 5?"]]
    assert result.extracted == ["5", "1200", "2.5"] and result.unfinished == 0
    wrong = {"2+3?": "#### 6", "10*120?": "1200 is close, so 1201", "half of 5?": "no idea"}
    result = math_eval.evaluate(CONFIG, params, TOK, RECORDS, max_new_tokens=24, batch_size=2,
                                generate_fn=oracle(wrong))
    assert result.score == 0.0 and result.extracted == ["6", "1201", None]
    # One right of three; a reply cut by the budget is kept, counted and still scored.
    mixed = {"2+3?": "#### 5", "10*120?": "x" * 30, "half of 5?": "#### 3"}
    result = math_eval.evaluate(CONFIG, params, TOK, RECORDS, max_new_tokens=24, batch_size=2,
                                generate_fn=oracle(mixed))
    assert result.score == pytest.approx(1 / 3) and result.correct == [True, False, False]
    assert result.unfinished == 1 and result.predictions[1] == "x" * 24


def test_records_without_a_reference_number_are_refused():
    bad = Record("q7", [{"role": "user", "content": "hi"}], {})
    with pytest.raises(ValueError, match="record 'q7': meta has no 'answer'"):
        math_eval.evaluate(CONFIG, None, TOK, [bad],
                           generate_fn=oracle({}))


def _reference_replies(params, records, max_new_tokens):
    """One prompt at a time, no cache, no padding: what the batched evaluation must reproduce."""
    texts = []
    for r in records:
        ids = TOK.encode_prompt(r.messages[0]["content"])
        out = models.generate_without_cache(CONFIG, params, np.array([ids]), np.array([len(ids)]),
                                            max_new_tokens, eos_id=TOK.eos_id)
        row = np.asarray(out)[0]
        hits = np.flatnonzero(row == TOK.eos_id)
        texts.append(TOK.decode(row[: hits[0]] if hits.size else row))
    return texts


@pytest.mark.slow
def test_batched_generation_matches_unbatched_decode_also_sharded():
    params = random_params(CONFIG, 3)
    records = RECORDS + [problem("d", "a much longer question than the others?", "1")]
    expected = _reference_replies(params, records, 12)
    result = math_eval.evaluate(CONFIG, params, TOK, records, max_new_tokens=12, batch_size=3)
    assert result.predictions == expected
    assert result.extracted == [math_eval.extract_answer(t) for t in expected]
    mesh_config = sharding.default_mesh_config()
    mesh_config.shape = (2, 1, 4)
    mesh = sharding.make_mesh(mesh_config)
    placed = sharding.shard(params, sharding.tree_shardings(params, sharding.LLAMA_RULES, mesh))
    assert "tensor" in str(placed["lm_head"]["kernel"].sharding.spec)
    sharded = math_eval.evaluate(CONFIG, placed, TOK, records, max_new_tokens=12, batch_size=2)
    assert sharded.predictions == expected


def test_chat_template_prompts_and_end_of_turn():
    from test_data_chat import char_tokenizer

    hf = char_tokenizer()
    record = problem("t", "1+1?", "2")
    ids = math_eval.prompt_ids(hf, record.messages)
    assert hf.decode(ids) == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    end = hf.convert_tokens_to_ids("<|im_end|>")
    seen = []

    def generate_fn(config, params, prompts, lengths, max_new_tokens, *, eos_id):
        seen.append((np.asarray(prompts)[0, : lengths[0]].tolist(), eos_id))
        reply = hf.encode("#### 2", add_special_tokens=False) + [end]
        return np.array([reply + [end] * (max_new_tokens - len(reply))])

    result = math_eval.evaluate(CONFIG, None, hf, [record], max_new_tokens=10, batch_size=1,
                                generate_fn=generate_fn)
    assert seen == [(ids, (end,))]
    assert result.predictions == ["#### 2"] and result.score == 1.0
