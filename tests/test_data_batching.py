"""Batching: answer-only loss mask, padding, deterministic streams, mixture proportions."""

import itertools

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from cpift_jax.data import batching, corpus, suite
from cpift_jax.data.suite import Example
from cpift_jax.data.tokenizer import CharTokenizer

TOK = CharTokenizer(("arith", "logic"))
C = {ch: TOK.encode(ch)[0] for ch in "0123456789<>:yn"}


def test_loss_mask_is_exactly_on_answer_and_eos_written_out():
    ex = [Example("arith", "<arith>12", "3", "12"), Example("logic", "7", "yn", "7")]
    out = batching.encode_examples(TOK, ex, 8)
    tag = TOK.tag_id("arith")
    np.testing.assert_array_equal(out["tokens"], [
        [1, tag, C["1"], C["2"], 3, C["3"], 2, 0],
        [1, C["7"], 3, C["y"], C["n"], 2, 0, 0],
    ])
    np.testing.assert_array_equal(out["loss_mask"], [
        [0, 0, 0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 1, 0, 0],
    ])
    assert out["tokens"].dtype == np.int32 and out["loss_mask"].dtype == bool


def test_encode_examples_accepts_tuples_and_refuses_overlong_rows():
    out = batching.encode_examples(TOK, [("1", "2")], 5)
    assert out["loss_mask"].tolist() == [[0, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="example 0 \\(task 'arith'\\) needs 8 tokens but seq_len "
                                         "is 6"):
        batching.encode_examples(TOK, [Example("arith", "123", "45", "123")], 6)
    with pytest.raises(ValueError, match="at least one example"):
        batching.encode_examples(TOK, [], 6)


def test_encode_prompts_right_pads_to_a_multiple():
    tokens, lengths = batching.encode_prompts(TOK, ["12", "3"], multiple=4)
    np.testing.assert_array_equal(tokens, [[1, C["1"], C["2"], 3], [1, C["3"], 3, 0]])
    np.testing.assert_array_equal(lengths, [4, 3])


@given(st.integers(1, 13), st.integers(1, 9), st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_index_stream_visits_every_row_once_per_epoch(num_rows, k, seed):
    stream = batching.IndexStream(num_rows, seed)
    idx = np.concatenate([stream.take(k) for _ in range(3 * num_rows)])
    for epoch in range(len(idx) // num_rows):
        assert sorted(idx[epoch * num_rows:(epoch + 1) * num_rows]) == list(range(num_rows))
    again = batching.IndexStream(num_rows, seed)
    np.testing.assert_array_equal(idx, np.concatenate([again.take(k) for _ in range(3 * num_rows)]))


def _arrays(n, offset):
    tokens = (np.arange(n)[:, None] + offset + np.zeros((1, 4), int)).astype(np.int32)
    return {"tokens": tokens, "loss_mask": np.ones_like(tokens, bool)}


def test_batches_deterministic_and_seed_dependent():
    arr = _arrays(10, 0)
    a = [b["tokens"][:, 0] for b in itertools.islice(batching.batches(arr, 4, 7), 5)]
    b = [b["tokens"][:, 0] for b in itertools.islice(batching.batches(arr, 4, 7), 5)]
    c = [b["tokens"][:, 0] for b in itertools.islice(batching.batches(arr, 4, 8), 5)]
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    assert not np.array_equal(np.concatenate(a), np.concatenate(c))
    with pytest.raises(ValueError, match="expected keys tokens and loss_mask"):
        next(batching.batches({"tokens": arr["tokens"]}, 4, 0))


def test_mixture_batches_balanced_and_weighted():
    arrays = {"a": _arrays(5, 0), "b": _arrays(7, 100), "c": _arrays(3, 200)}
    uniform = {"a": 1, "b": 1, "c": 1}
    for batch in itertools.islice(batching.mixture_batches(arrays, uniform, 6, 0), 10):
        counts = np.bincount(batch["tokens"][:, 0] // 100, minlength=3)
        assert counts.tolist() == [2, 2, 2]
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    rows = np.concatenate([b["tokens"][:, 0] for b in
                           itertools.islice(batching.mixture_batches(arrays, weights, 7, 1), 30)])
    counts = np.bincount(rows // 100, minlength=3)
    assert np.all(np.abs(counts - 210 * np.array([0.5, 0.3, 0.2])) <= 2)
    with pytest.raises(ValueError, match="weights are for tasks"):
        next(batching.mixture_batches(arrays, {"a": 1}, 4, 0))


def test_pretrain_arrays_are_lm_rows():
    out = corpus.pretrain_arrays(TOK, 64, suite_config=_two_task_config(), seed=0,
                                 task_fraction=0.2)
    assert out["tokens"].shape[1] == 64 and out["tokens"].shape[0] > 1000
    assert out["loss_mask"].all()
    again = corpus.pretrain_arrays(TOK, 64, suite_config=_two_task_config(), seed=0,
                                   task_fraction=0.2)
    np.testing.assert_array_equal(out["tokens"], again["tokens"])
    # Task text is present, about as often as asked (tag tokens mark task rows).
    assert (out["tokens"] == TOK.sep_id).sum() > 1000


def _two_task_config():
    config = suite.default_config()
    config.tasks = ("arith", "logic")
    return config


def test_random_access_batches_equal_the_streams_and_keep_rows_whole():
    arrays = {"a": _arrays(5, 0), "b": _arrays(7, 100), "c": _arrays(3, 200)}
    for a in arrays.values():  # a loss mask that identifies its row, to catch mismatched pairs
        a["loss_mask"] = (a["tokens"] + np.arange(4)[None]) % 3 == 0
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    stream = list(itertools.islice(batching.mixture_batches(arrays, weights, 7, 2), 200))
    source = batching.MixtureBatches(arrays, weights, 7, 2)
    for i in (199, 3, 64, 130, 0):  # out of order: earlier batches are never generated first
        for key in ("tokens", "loss_mask"):
            np.testing.assert_array_equal(source[i][key], stream[i][key])
            np.testing.assert_array_equal(source.rows(i, 2, 6)[key], stream[i][key][2:6])
    for batch in stream:
        np.testing.assert_array_equal(batch["loss_mask"],
                                      (batch["tokens"] + np.arange(4)[None]) % 3 == 0)
    uniform = list(itertools.islice(batching.batches(arrays["b"], 4, 1), 9))
    np.testing.assert_array_equal(batching.UniformBatches(arrays["b"], 4, 1).rows(8, 1, 3)["tokens"],
                                  uniform[8]["tokens"][1:3])


def test_index_stream_read_from_many_threads_gives_the_sequential_positions():
    """A loader's prefetch threads read one stream at once; every read must still be the
    position's own epoch order (no thread may return the permutation another thread cached)."""
    from concurrent.futures import ThreadPoolExecutor

    expected = batching.IndexStream(7, seed=3)
    positions = [(start, 5) for start in range(0, 7 * 300, 5)]
    want = [expected.at(start, k) for start, k in positions]
    shared = batching.IndexStream(7, seed=3)
    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda p: shared.at(*p), positions))
        for w, g, p in zip(want, got, positions):
            np.testing.assert_array_equal(g, w, err_msg=f"positions {p}")
