"""Multiple choice: option log-likelihoods against a float64 NumPy reference, the three
accuracies, and letter answers from oracle generators."""

import numpy as np
import pytest

from cpift_jax import models, sharding
from cpift_jax.data.readers import Record
from cpift_jax.data.tokenizer import CharTokenizer
from cpift_jax.evals import multiple_choice as mc
from test_evals_math import oracle, random_params

TOK = CharTokenizer()
CONFIG = models.ModelConfig(vocab_size=TOK.vocab_size, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=128)


def question(rid, text, options, gold):
    lettered = "\n".join(f"{'ABCDE'[i]}. {o}" for i, o in enumerate(options))
    return Record(rid, [{"role": "user", "content": f"{text}\n{lettered}\nAnswer with the letter."},
                        {"role": "assistant", "content": "ABCDE"[gold]}],
                  {"question": text, "options": options, "gold": gold,
                   "letter": "ABCDE"[gold]})


RECORDS = [question("q1", "Sky colour?", ["blue", "a very long green option", "red"], 0),
           question("q2", "2+2?", ["4", "five"], 1),
           question("q3", "Pick one", ["x", "yy", "zzz", "wwww"], 3)]


def reference_loglikelihoods(params, pairs):
    """float64, per (context, continuation): sum over the continuation characters of
    log p(char | everything before it), from one ``models.logits`` call on padded rows."""
    rows = [([TOK.bos_id] + TOK.encode(c), TOK.encode(x)) for c, x in pairs]
    width = max(len(a) + len(b) for a, b in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    for i, (a, b) in enumerate(rows):
        tokens[i, : len(a) + len(b)] = a + b
    logits = np.asarray(models.logits(CONFIG, params, tokens), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return [sum(logp[i, j - 1, tokens[i, j]] for j in range(len(a), len(a) + len(b)))
            for i, (a, b) in enumerate(rows)]


def test_loglikelihoods_and_accuracies_match_a_float64_reference():
    params = random_params(CONFIG, 1)
    result = mc.evaluate(CONFIG, params, TOK, RECORDS, batch_size=4)  # 9 rows: padded batch
    pairs = [(f"Question: {r.meta['question']}\nAnswer:", " " + o)
             for r in RECORDS for o in r.meta["options"]]
    flat = reference_loglikelihoods(params, pairs)
    for i, r in enumerate(RECORDS):
        n = len(r.meta["options"])
        expected, flat = flat[:n], flat[n:]
        np.testing.assert_allclose(result.loglikelihoods[i], expected, rtol=1e-5)
        chars = [len(o) + 1 for o in r.meta["options"]]  # CharTokenizer: one token per char
        assert result.predicted[i] == int(np.argmax(expected))
        assert result.predicted_per_char[i] == int(np.argmax(np.divide(expected, chars)))
        assert result.predicted_per_token[i] == result.predicted_per_char[i]
    gold = [r.meta["gold"] for r in RECORDS]
    assert result.gold == gold
    assert result.accuracy == np.mean(np.equal(result.predicted, gold))
    assert result.accuracy_per_char == np.mean(np.equal(result.predicted_per_char, gold))


def test_encode_options_splits_at_the_context_tokens():
    rows = mc.encode_options(TOK, "Q:", [" a", " bc"])
    assert rows == [([TOK.bos_id] + TOK.encode("Q: a"), 3), ([TOK.bos_id] + TOK.encode("Q: bc"), 3)]
    with pytest.raises(ValueError, match="option 1 \\(''\\) adds no tokens"):
        mc.encode_options(TOK, "Q:", [" a", ""])
    bad = Record("r9", [], {"options": ["only one"], "gold": 0, "question": "?"})
    with pytest.raises(ValueError, match="record 'r9': meta\\['options'\\] must be a list of at"):
        mc.evaluate(CONFIG, None, TOK, [bad])


@pytest.mark.parametrize("text, expected", [
    ("B", 1), ("(C) because", 2), ("Answer: D. Paris", 3), ("The answer is A", 0),
    ("I'd say b or E", 4), ("Answer unclear", None), ("F", None),
])
def test_first_letter(text, expected):
    assert mc.first_letter(text, 5) == expected


def test_letter_answers_with_oracles():
    prompts = [r.messages[0]["content"] for r in RECORDS]
    right = dict(zip(prompts, ["A", "The answer is B.", "(D)"]))
    result = mc.evaluate_letters(CONFIG, None, TOK, RECORDS, max_new_tokens=24, batch_size=2,
                                 generate_fn=oracle(right))
    assert result.accuracy == 1.0 and result.chosen == [0, 1, 3]
    wrong = dict(zip(prompts, ["B", "Answer: none", "C"]))
    result = mc.evaluate_letters(CONFIG, None, TOK, RECORDS, max_new_tokens=24, batch_size=2,
                                 generate_fn=oracle(wrong))
    assert result.accuracy == 0.0 and result.chosen == [1, None, 2]
    # The first option letter counts, even when the reply goes on to name another.
    # Only the record's own option letters count: q2 has no option C.
    mixed = dict(zip(prompts, ["C, no: A", "C, no: B", "D is out, so C"]))
    result = mc.evaluate_letters(CONFIG, None, TOK, RECORDS, max_new_tokens=24, batch_size=2,
                                 generate_fn=oracle(mixed))
    assert result.chosen == [2, 1, 3] and result.accuracy == pytest.approx(2 / 3)


@pytest.mark.slow
def test_sharded_parameters_and_batch_sizes_give_the_same_loglikelihoods():
    params = random_params(CONFIG, 2)
    plain = mc.evaluate(CONFIG, params, TOK, RECORDS, batch_size=9)
    mesh_config = sharding.default_mesh_config()
    mesh_config.shape = (2, 1, 4)
    mesh = sharding.make_mesh(mesh_config)
    placed = sharding.shard(params, sharding.tree_shardings(params, sharding.LLAMA_RULES, mesh))
    sharded = mc.evaluate(CONFIG, placed, TOK, RECORDS, batch_size=2, vocab_chunk=16)
    np.testing.assert_allclose(np.concatenate(sharded.loglikelihoods),
                               np.concatenate(plain.loglikelihoods), rtol=1e-5)
    assert sharded.predicted == plain.predicted
