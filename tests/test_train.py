"""Train step, training loop, greedy evaluation and the cached toy base model."""

import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpift_jax import models, optim
from cpift_jax.training import evaluate
from cpift_jax.training import pretrain
from cpift_jax.training import step
from cpift_jax.training import train
from cpift_jax.data import batching, suite
from cpift_jax.data.suite import Example
from cpift_jax.data.tokenizer import CharTokenizer

TASKS = ("arith", "logic")
TOK = CharTokenizer(TASKS)
CONFIG = models.ModelConfig(vocab_size=TOK.vocab_size, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=64)


def _suite_config():
    config = suite.default_config()
    config.tasks, config.similarity, config.max_digits = TASKS, 1.0, 3
    return config


def _opt(steps, lr=1e-2):
    config = optim.default_config()
    config.learning_rate, config.warmup_steps, config.total_steps = lr, 0, steps
    config.schedule = "constant"
    return config


def _batch(n=8, seed=0):
    examples = [e for t in TASKS for e in suite.generate(t, seed, n // 2, config=_suite_config())]
    return batching.encode_examples(TOK, examples, 16)


def test_masked_cross_entropy_written_out():
    # Row 0: logits (0, log 3) -> p = (1/4, 3/4); target 1 -> -log(3/4), target 0 -> log 4.
    logits = jnp.log(jnp.array([[[1.0, 3.0], [1.0, 3.0], [5.0, 5.0]]]))
    targets = jnp.array([[1, 0, 0]])
    loss, count = train.masked_cross_entropy(logits, targets, jnp.array([[True, True, False]]))
    assert float(count) == 2.0
    np.testing.assert_allclose(float(loss), (-math.log(0.75) + math.log(4)) / 2, rtol=1e-6)
    loss, count = train.masked_cross_entropy(logits, targets, jnp.zeros((1, 3), bool))
    assert float(loss) == 0.0 and float(count) == 0.0


@pytest.mark.slow
def test_step_loss_counts_only_answer_tokens():
    params = models.init_params(CONFIG, 0)
    batch = _batch()
    loss, tokens, _ = jax.jit(lambda p, b: step.loss_and_grads(CONFIG, step.StepConfig(), p, b))(
        params, batch)
    assert float(tokens) == batch["loss_mask"][:, 1:].sum()
    # Reference: float64 numpy over the masked positions only.
    logits = np.asarray(models.logits(CONFIG, params, batch["tokens"][:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
    m = batch["loss_mask"][:, 1:]
    np.testing.assert_allclose(float(loss), nll[m].mean(), rtol=1e-5)


@pytest.mark.slow
def test_a_few_steps_reduce_the_loss_and_keep_caller_params():
    params = models.init_params(CONFIG, 0)
    before = jax.tree.map(np.array, params)
    batch = _batch()
    out, history = train.train(CONFIG, params, _opt(30), iter(lambda: batch, None), steps=30,
                               log_every=1, progress=False)
    losses = [r["loss"] for r in history]
    assert losses[-1] < 0.5 * losses[0]
    # The caller's arrays were not donated away and are unchanged.
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))
    assert not np.array_equal(out["lm_head"]["kernel"], params["lm_head"]["kernel"])


@pytest.mark.slow  # several seconds of compilation: kept out of the fast tier
def test_frozen_entries_stay_bit_identical_and_runs_are_deterministic():
    params = models.init_params(CONFIG, 1)
    rng = np.random.default_rng(0)
    frozen = jax.tree.map(lambda x: rng.random(x.shape) < 0.5, params)
    batch = _batch()
    runs = [train.train(CONFIG, params, _opt(5), iter(lambda: batch, None), steps=5,
                        frozen=frozen, progress=False)[0] for _ in range(2)]

    def check(p, new, f):
        p, new = np.asarray(p), np.asarray(new)
        np.testing.assert_array_equal(new[f].view(np.uint32), p[f].view(np.uint32))
        assert np.any(new[~f] != p[~f])

    jax.tree.map(check, params, runs[0], frozen)
    jax.tree.map(np.testing.assert_array_equal, runs[0], runs[1])


@pytest.mark.slow  # several seconds of compilation: kept out of the fast tier
def test_train_writes_jsonl_and_evaluates(tmp_path):
    calls = []

    def eval_fn(p):
        calls.append(1)
        return {"arith": 0.5, "mean": 0.5}

    batch = _batch()
    path = tmp_path / "metrics.jsonl"
    _, history = train.train(CONFIG, models.init_params(CONFIG, 0), _opt(7),
                             iter(lambda: batch, None), steps=7, eval_every=3, eval_fn=eval_fn,
                             log_every=2, metrics_path=path, progress=False)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == history
    assert [r["step"] for r in records] == [2, 3, 4, 6, 7]
    assert [r["step"] for r in records if "eval" in r] == [3, 6, 7] and len(calls) == 3
    assert records[-1]["eval"] == {"arith": 0.5, "mean": 0.5}
    assert {"loss", "grad_norm", "tokens", "learning_rate", "elapsed_s"} <= set(records[0])
    assert records[0]["learning_rate"] == pytest.approx(1e-2)


def test_train_errors():
    params, batch = models.init_params(CONFIG, 0), _batch()
    with pytest.raises(ValueError, match="steps must be a positive int"):
        train.train(CONFIG, params, _opt(1), iter([batch]), steps=0)
    with pytest.raises(ValueError, match="no eval_fn"):
        train.train(CONFIG, params, _opt(1), iter([batch]), steps=1, eval_every=1)
    with pytest.raises(ValueError, match="keys tokens and loss_mask"):
        train.train(CONFIG, params, _opt(1), iter([{"tokens": batch["tokens"]}]), steps=1,
                    progress=False)


def _fake_generate(answer_of):
    """A generate_fn that answers each prompt with ``answer_of(prompt_text)`` then EOS."""

    def generate(config, params, prompts, lengths, max_new_tokens, *, eos_id):
        out = np.full((len(prompts), max_new_tokens), eos_id, np.int32)
        for i, (row, n) in enumerate(zip(np.asarray(prompts), np.asarray(lengths))):
            ids = TOK.encode(answer_of(TOK.decode(row[:n])))[:max_new_tokens]
            out[i, :len(ids)] = ids
        return out

    return generate


def test_evaluate_oracle_scores_one_and_wrong_scores_zero():
    examples = {t: suite.generate(t, 0, 7, split="test", config=_suite_config()) for t in TASKS}
    answers = {e.prompt: e.answer for t in TASKS for e in examples[t]}
    params = models.init_params(CONFIG, 0)
    oracle = _fake_generate(lambda p: answers[p])
    scores, preds = evaluate.evaluate(CONFIG, params, TOK, examples, batch_size=4,
                                      generate_fn=oracle, return_predictions=True)
    assert scores == {"arith": 1.0, "logic": 1.0}
    assert preds["logic"] == [e.answer for e in examples["logic"]]
    wrong = _fake_generate(lambda p: answers[p] + "0")
    assert evaluate.evaluate(CONFIG, params, TOK, examples, max_new_tokens=8,
                             generate_fn=wrong) == {"arith": 0.0, "logic": 0.0}
    # No EOS within the budget scores 0 even when the output starts with the answer.
    no_eos = _fake_generate(lambda p: answers[p] + "9999999")
    assert evaluate.evaluate(CONFIG, params, TOK, examples, max_new_tokens=4,
                             generate_fn=no_eos) == {"arith": 0.0, "logic": 0.0}
    with pytest.raises(ValueError, match="task 'logic' has no evaluation examples"):
        evaluate.evaluate(CONFIG, params, TOK, {"logic": []})


@pytest.mark.slow  # several seconds of compilation: kept out of the fast tier
def test_evaluate_with_the_real_model_matches_predict():
    examples = {"logic": [Example("logic", "<logic>12", "ny", "12"),
                          Example("logic", "<logic>3", "y", "3"),
                          Example("logic", "<logic>456", "nyn", "456")]}
    params = models.init_params(CONFIG, 0)
    scores, preds = evaluate.evaluate(CONFIG, params, TOK, examples, batch_size=2,
                                      return_predictions=True)
    direct = evaluate.predict(CONFIG, params, TOK, [e.prompt for e in examples["logic"]],
                              max_new_tokens=4, batch_size=2)
    assert preds["logic"] == direct
    fn = evaluate.make_eval_fn(CONFIG, TOK, examples, batch_size=2)
    assert fn(params) == {**scores, "mean": scores["logic"]}


@pytest.mark.slow
def test_pretrain_base_is_cached(tmp_path):
    config = pretrain.default_config()
    config.steps, config.batch_size, config.seq_len = 3, 4, 32
    config.optimizer.warmup_steps = 1
    first = pretrain.pretrain_base(tmp_path, CONFIG, TOK, _suite_config(), config,
                                   progress=False)
    assert (tmp_path / "base_metrics.jsonl").exists()
    again = pretrain.pretrain_base(tmp_path, CONFIG, TOK, _suite_config(), config,
                                   progress=False)
    jax.tree.map(np.testing.assert_array_equal, first, again)
    config.steps = 4
    with pytest.raises(ValueError, match="different settings \\(pretrain.optimizer.total_steps, "
                                         "pretrain.steps\\)"):
        pretrain.pretrain_base(tmp_path, CONFIG, TOK, _suite_config(), config, progress=False)


def test_load_npz_checks_leaves(tmp_path):
    params = models.init_params(CONFIG, 0)
    pretrain.save_npz(tmp_path / "p.npz", {"a": np.zeros(2)})
    with pytest.raises(ValueError, match="leaf 'a' is only in the file"):
        pretrain.load_npz(tmp_path / "p.npz", params)


# ----------------------------------------------------------------- mid-stage checkpoints

TWO_LAYERS = models.ModelConfig(vocab_size=TOK.vocab_size, hidden_size=16, intermediate_size=32,
                                num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=64)


class _Preempted(RuntimeError):
    pass


class _PreemptedAt:
    """``inner`` until its ``at``-th batch, whose fetch raises (a preemption mid-stage);
    ``get_state``/``set_state`` are the inner iterator's when it has them."""

    def __init__(self, inner, at):
        self.inner, self.at, self.taken = inner, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.taken += 1
        if self.taken == self.at:
            raise _Preempted(f"batch {self.at}")
        return next(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _untouchable():
    raise AssertionError("a finished run must not read batches")
    yield  # noqa: unreachable (makes this a generator)


def _loader(seed=3):
    from cpift_jax import sharding
    from cpift_jax.data import loader

    mesh = sharding.make_mesh(sharding.default_mesh_config(), devices=jax.devices()[:1])
    source = batching.UniformBatches(_batch(n=32, seed=seed), 8, seed)
    return loader.GlobalBatchLoader(source, step.batch_sharding(mesh, 8), 16)


def _opt_decay(steps):
    config = optim.default_config()
    config.learning_rate, config.warmup_steps, config.total_steps = 1e-2, 2, steps
    config.weight_decay = 0.01
    return config


@pytest.mark.slow
def test_an_interrupted_run_resumes_from_its_checkpoint_with_the_same_bits(tmp_path):
    """Scanned layers (a stacked state on disk) and a Grain loader: preempted while fetching
    batch 5 of 6 with checkpoints every 2 steps, the rerun restores step 4 and the loader's
    position and ends on the uninterrupted run's bits; a third run returns the finished
    checkpoint's params without reading a batch."""
    params = models.init_params(TWO_LAYERS, 0)
    rng = np.random.default_rng(0)
    frozen = jax.tree.map(lambda x: rng.random(x.shape) < 0.3, params)
    frozen["model"]["layers"][1]["input_layernorm"]["weight"] = True  # mixed across layers
    kwargs = dict(steps=6, frozen=frozen, progress=False, log_every=1,
                  step_config=step.StepConfig(scan_layers=True, remat="layer"))
    straight, _ = train.train(TWO_LAYERS, params, _opt_decay(6), _loader(), **kwargs)

    ckpt = tmp_path / "run"
    with pytest.raises(_Preempted):
        train.train(TWO_LAYERS, params, _opt_decay(6), _PreemptedAt(_loader(), 5),
                    checkpoint_dir=ckpt, checkpoint_every=2, **kwargs)
    assert sorted(p.name for p in ckpt.iterdir()) == ["2", "4"]
    batches = _loader()
    resumed, history = train.train(TWO_LAYERS, params, _opt_decay(6), batches,
                                   checkpoint_dir=ckpt, checkpoint_every=2, **kwargs)
    assert [r["step"] for r in history] == [5, 6]
    assert batches.get_state()["next_index"] == 6  # restored at 4, then two batches
    assert sorted(p.name for p in ckpt.iterdir()) == ["4", "6"]
    assert jax.tree.structure(resumed) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)

    finished, history = train.train(TWO_LAYERS, params, _opt_decay(6), _untouchable(),
                                    checkpoint_dir=ckpt, checkpoint_every=2, **kwargs)
    assert history == []
    jax.tree.map(np.testing.assert_array_equal, straight, finished)


@pytest.mark.slow
def test_a_plain_iterator_resumes_by_skipping_batches_and_a_foreign_checkpoint_raises(tmp_path):
    params = models.init_params(CONFIG, 0)
    data = [_batch(seed=i) for i in range(5)]
    straight, _ = train.train(CONFIG, params, _opt_decay(5), iter(data), steps=5,
                              progress=False)
    ckpt = tmp_path / "run"
    with pytest.raises(_Preempted):
        train.train(CONFIG, params, _opt_decay(5), _PreemptedAt(iter(data), 4), steps=5,
                    progress=False, checkpoint_dir=ckpt, checkpoint_every=3)
    resumed, history = train.train(CONFIG, params, _opt_decay(5), iter(data), steps=5,
                                   progress=False, log_every=1, checkpoint_dir=ckpt,
                                   checkpoint_every=3)
    assert [r["step"] for r in history] == [4, 5]
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)

    # Another model width: the same leaves with other shapes than the checkpoint's.
    wider = dataclasses.replace(CONFIG, hidden_size=32)
    with pytest.raises(ValueError, match=rf"leaf '.*': expected has shape .*, "
                                         rf"{re.escape(str(ckpt / '5'))} has shape"):
        train.train(wider, models.init_params(wider, 0), _opt_decay(5), iter(data), steps=5,
                    progress=False, checkpoint_dir=ckpt, checkpoint_every=3)
    with pytest.raises(ValueError, match="checkpoint_every is 0"):
        train.train(CONFIG, params, _opt_decay(5), iter(data), steps=5, checkpoint_dir=ckpt)
