"""Real tasks of the benchmark: config checks, fitting to seq_len, splits and samples, metrics.

Uses the datasets CI fetches (``python -m cpift_jax.data.fetch``, linked into the test cache by
conftest) and the character-level ChatML tokenizer of test_data_chat, so every length is exact.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from configs import real as real_config
from cpift_jax.benchmark import real_tasks, tasks
from cpift_jax.data import fetch
from cpift_jax.data.readers import Record
from test_data_chat import char_tokenizer

TOK = char_tokenizer()


def small_config(**data):
    c = real_config.get_config("smoke")
    c.data.update(data)
    return c


def test_check_config_names_the_bad_key(tmp_path, monkeypatch):
    c = small_config()
    real_tasks.check_config(c)  # the fetched datasets
    c.data.tasks.math.metric = "bleu"
    with pytest.raises(ValueError, match=r"'data.tasks.math.metric' must be one of"):
        real_tasks.check_config(c)
    c = small_config()
    c.data.tasks.chat.source = "$CPIFT_NO_SUCH_VAR/chat.jsonl"
    monkeypatch.delenv("CPIFT_NO_SUCH_VAR", raising=False)
    with pytest.raises(ValueError, match=r"'data.tasks.chat.source' .* environment variable"):
        real_tasks.check_config(c)
    c.data.tasks.chat.source = str(tmp_path / "chat.jsonl")
    with pytest.raises(ValueError, match=r"'data.tasks.chat.reader' is empty"):
        real_tasks.check_config(c)
    c.data.tasks.chat.reader = "ultrachat"
    with pytest.raises(ValueError, match=r"neither a dataset .* nor an existing file"):
        real_tasks.check_config(c)
    (tmp_path / "chat.jsonl").write_text("")
    real_tasks.check_config(c)
    c.eval.choice_normalization = "per_word"
    with pytest.raises(ValueError, match=r"'eval.choice_normalization'"):
        real_tasks.check_config(c)


def _turns(*pairs):
    out = []
    for q, a in pairs:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out


def test_fit_record_keeps_the_longest_prefix_of_whole_turns():
    record = Record("r", _turns(("q1", "a1"), ("q2", "answer two"), ("q3", "a3")))

    def tokens(messages):  # the rendered conversation, template newline after each turn included
        text = TOK.apply_chat_template(messages, tokenize=False)
        return len(TOK(text, add_special_tokens=False)["input_ids"])

    one, two = tokens(record.messages[:2]), tokens(record.messages[:4])
    assert one == len("user\nq1" "\n" "assistant\na1" "\n") + 4  # + 4 special tokens
    assert real_tasks.fit_record(TOK, record, 10_000) is record
    cut = real_tasks.fit_record(TOK, record, one)  # exactly the first exchange fits
    assert cut.messages == record.messages[:2] and cut.id == "r"
    assert real_tasks.fit_record(TOK, record, one - 1) is None
    assert real_tasks.fit_record(TOK, record, two).messages == record.messages[:4]
    assert real_tasks.fit_record(TOK, record, two - 1).messages == record.messages[:2]


def test_load_splits_and_samples_real_datasets():
    c = small_config(n_train=6, n_test=3, seq_len=4096)
    seed0, seed1 = real_tasks.load(c, TOK, 0), real_tasks.load(c, TOK, 1)
    assert list(seed0) == ["chat", "code", "logic", "math"]  # ConfigDict keys are sorted
    for name in seed0:
        a, b = seed0[name], seed1[name]
        assert len(a.train) == 6 and len(a.test) == 3
        assert [r.id for r in a.test] == [r.id for r in b.test]  # one test set for every seed
        assert [r.id for r in a.train] != [r.id for r in b.train]  # a seeded training sample
        assert not {r.id for r in a.train} & {r.id for r in a.test}
    # MBPP trains, HumanEval tests.
    assert all(r.id.startswith("mbpp/") for r in seed0["code"].train)
    assert all(r.id.startswith("HumanEval/") for r in seed0["code"].test)
    # GSM8K's split is the id-hash rule of readers.is_test.
    from cpift_jax.data import readers
    assert all(readers.is_test(r, c.data.test_fraction) for r in seed0["math"].test)


@pytest.mark.slow  # several seconds of compilation: kept out of the fast tier
def test_load_cuts_long_conversations_and_says_when_nothing_fits():
    c = small_config(n_train=8, n_test=2, seq_len=2500)
    chat_task = real_tasks.load(c, TOK, 0)["chat"]
    original = {r.id: r for r in fetch.load("coqa")}
    cut = 0
    for r in chat_task.train + chat_task.test:
        full = original[r.id].messages
        assert r.messages == full[: len(r.messages)] and r.messages[-1]["role"] == "assistant"
        rendered = TOK.apply_chat_template(r.messages, tokenize=False)
        assert len(TOK(rendered.rstrip(), add_special_tokens=False)["input_ids"]) <= 2500
        cut += len(r.messages) < len(full)
    assert cut > 0  # CoQA stories with all their turns exceed 2500 characters
    c = small_config(n_train=2, n_test=2, seq_len=40)
    with pytest.raises(ValueError, match=r"task 'chat' \(test\): no record fits in data.seq_len = 40"):
        real_tasks.load(c, TOK, 0)


def test_train_arrays_supervise_only_assistant_tokens():
    c = small_config(n_train=3, n_test=1, seq_len=4096)
    data = {"math": real_tasks.load(c, TOK, 0)["math"]}
    rows = real_tasks.train_arrays(TOK, data, 4096, pack=False)["math"]
    assert rows["tokens"].shape == (3, 4096)
    for record, tokens, mask in zip(data["math"].train, rows["tokens"], rows["loss_mask"]):
        answer = record.messages[-1]["content"] + "<|im_end|>"
        assert tokens[mask].tolist() == TOK(answer, add_special_tokens=False)["input_ids"]


@pytest.mark.slow  # several seconds of compilation: kept out of the fast tier
def test_packed_train_arrays_hold_every_conversation_once():
    c = small_config(n_train=6, n_test=1, seq_len=1024)
    data = {"logic": real_tasks.load(c, TOK, 0)["logic"]}
    rows = real_tasks.train_arrays(TOK, data, 1024, pack=True)["logic"]
    assert rows["tokens"].shape[0] < 6  # ARC conversations are short: several per row
    supervised = []
    for tokens, mask, seg in zip(rows["tokens"], rows["loss_mask"], rows["segment_ids"]):
        for s in range(1, seg.max() + 1):
            supervised.append(tokens[(seg == s) & mask].tolist())
    want = [TOK(r.messages[-1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            for r in data["logic"].train]
    assert sorted(supervised) == sorted(want)


def test_metric_labels_follow_the_code_execution_opt_in():
    c = small_config()
    labels = tasks.metric_labels(c)
    assert labels["code"] == "2^-bits/byte (code execution off)"
    assert labels["math"] == "exact match" and labels["logic"] == "accuracy (per_char)"
    c.eval.allow_code_execution = True
    assert tasks.metric_labels(c)["code"] == "pass@1"


def test_heldout_score_is_two_to_the_minus_bits_per_byte(monkeypatch):
    from cpift_jax.evals import heldout

    result = heldout.HeldoutResult(loss=0.0, bits_per_byte=1.5, total_nll=0.0, total_tokens=0,
                                   total_bytes=0, ids=["a", "b"], nll=[np.log(2) * 4, 0.0],
                                   tokens=[1, 1], bytes=[2, 5])
    monkeypatch.setattr(heldout, "evaluate", lambda *a, **k: result)
    task = real_tasks.TaskData("chat", "heldout", [], [Record("a", []), Record("b", [])])
    score = real_tasks.evaluate_task(None, None, TOK, task, real_tasks.task_config("coqa", "heldout"),
                                     real_tasks.eval_config(), 64)
    assert score.score == pytest.approx(2 ** -1.5)
    assert score.per_example == pytest.approx([0.25, 1.0])  # 2 bits/byte, then 0


@pytest.mark.slow
@pytest.mark.skipif(not fetch.is_available("gsm8k"), reason="needs python -m cpift_jax.data.fetch")
def test_real_smoke_runs_end_to_end(tmp_path):
    """configs/real.py:smoke through the binary: every method scored on every real task."""
    import json

    from cpift_jax.models import smollm2

    assert smollm2.is_available(), "needs python -m cpift_jax.models.smollm2 --fetch"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as users
    subprocess.run([sys.executable, "-m", "experiments.cpift", "--config=configs/real.py:smoke",
                    f"--workdir={tmp_path}"], check=True, timeout=900, env=env)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tasks"] == ["chat", "code", "logic", "math"]
    assert results["metrics"]["code"].startswith("2^-bits/byte")
    for key in real_config.get_config("smoke").methods:
        scores = results["methods"][key]["per_task"]
        assert set(scores) == set(results["tasks"])
        assert all(np.isfinite(s["mean"]) for s in scores.values()), key
    experts = json.loads((tmp_path / "seed0" / "experts" / "DONE.json").read_text())["result"]
    assert all(len(v) == 2 for v in experts["base_per_example"].values())  # n_test = 2
    assert results["chance"] == experts["base"]  # real tasks: the floor is the base model
    assert "| CPI-FT |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_hf_backend_loads_the_base_sharded_with_its_tokenizer(tmp_path):
    """``model.backend = "hf"``: the checkpoint and tokenizer of ``model.hf_path``, the weights
    placed on the configured mesh by the sharded reader, equal to a plain ``hf.load``."""
    import jax

    from cpift_jax.benchmark import pipeline
    from cpift_jax.models import hf
    from test_hf_sharded_load import distinct_params, tiny_config, write_checkpoint

    config = tiny_config(vocab_size=len(TOK))
    path = write_checkpoint(tmp_path / "ckpt", config, distinct_params(config))
    TOK.save_pretrained(path)
    c = small_config()
    c.model = real_config.ml_collections.ConfigDict(dict(backend="hf", hf_path=str(path)))
    c.mesh.shape = (2, 4, 1)
    c.train.batch_size = c.data.n_train = 8
    run = pipeline._Run(c, tmp_path / "workdir")
    model_config, tokenizer, params = pipeline._build_base(c, run.like)
    assert model_config == hf.load_config(path)
    assert tokenizer.hf.chat_template == TOK.chat_template
    _, reference = hf.load(path)
    like = run.like(model_config)
    for got, want, target in zip(jax.tree.leaves(params), jax.tree.leaves(reference),
                                 jax.tree.leaves(like)):
        assert got.sharding == target.sharding
        np.testing.assert_array_equal(np.asarray(got), want)
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(
        jax.tree.map(lambda x: x.sharding, params)))
