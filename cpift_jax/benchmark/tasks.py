"""The benchmark's tasks behind one interface: the synthetic suite or real datasets.

A config with ``data.tasks`` (``configs/real.py``, ``configs/paper/``) runs on real datasets
(``cpift_jax.benchmark.real_tasks``); otherwise on the synthetic suite of ``config.suite``
(``cpift_jax.data.suite``). Either way a seed gets a ``TaskSet``: the task names, their training
rows, the mixture weights of multi-task training and an evaluator ``(params, tasks) -> {task:
TaskScore}`` whose scores are higher-is-better and come with their per-example values.

Normalisation floors (``floors``): the synthetic suite's chance levels (the best constant
answer); for real tasks the base model's own score, so a normalised score reads as the share of
the expert's gain over the base model that a method keeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cpift_jax.benchmark.real_tasks import TaskScore
from cpift_jax.data import batching
from cpift_jax.data import suite as suite_lib

__all__ = ["TaskScore", "TaskSet", "is_real", "names", "build", "metric_labels",
           "synthetic_floors"]

Pytree = Any


def is_real(config) -> bool:
    """Whether ``config`` names real datasets (``data.tasks``) instead of the synthetic suite."""
    return "tasks" in config.data


def names(config) -> tuple[str, ...]:
    """The task names: the suite's order, or sorted (``ConfigDict`` keys iterate sorted)."""
    return tuple(config.data.tasks.keys()) if is_real(config) else tuple(config.suite.tasks)


@dataclasses.dataclass
class TaskSet:
    names: tuple[str, ...]
    train_arrays: Mapping[str, dict]  # task -> batching arrays (tokens, loss_mask, ...)
    mixture: Mapping[str, float]  # sampling weights of a multi-task mixture
    evaluate: Callable[[Pytree, Sequence[str]], dict[str, TaskScore]]


def metric_labels(config) -> dict[str, str]:
    """Task -> what its score measures, for reports."""
    if not is_real(config):
        return {t: "exact match" for t in config.suite.tasks}
    from cpift_jax.benchmark import real_tasks
    return {t: real_tasks.metric_label(config.data.tasks[t], config.eval) for t in names(config)}


def synthetic_floors(config) -> dict[str, float]:
    return {t: suite_lib.chance_level(t, config.suite) for t in config.suite.tasks}


def _synthetic(config, model_config, tokenizer, seed: int) -> TaskSet:
    from cpift_jax.training import evaluate as evaluate_lib

    c = config
    data = suite_lib.make_suite(c.suite, seed, c.data.n_train, c.data.n_test)
    tasks = tuple(c.suite.tasks)
    arrays = {t: batching.encode_examples(tokenizer, data[t]["train"], c.data.seq_len)
              for t in tasks}

    def evaluate(params, which):
        examples = {t: data[t]["test"] for t in which}
        scores, predictions = evaluate_lib.evaluate(
            model_config, params, tokenizer, examples, batch_size=c.data.eval_batch_size,
            return_predictions=True)
        return {t: TaskScore(scores[t], [
            suite_lib.exact_match(p, ex.answer) if p is not None else 0.0
            for p, ex in zip(predictions[t], examples[t])]) for t in which}

    return TaskSet(tasks, arrays, suite_lib.mixture_weights(c.suite), evaluate)


def _real(config, model_config, tokenizer, seed: int) -> TaskSet:
    from cpift_jax.benchmark import real_tasks

    data = real_tasks.load(config, tokenizer, seed)
    tasks = tuple(data)
    arrays = real_tasks.train_arrays(tokenizer, data, config.data.seq_len, pack=config.data.pack)

    def evaluate(params, which):
        return real_tasks.evaluate(model_config, params, tokenizer, data, config, which)

    return TaskSet(tasks, arrays, {t: 1.0 / len(tasks) for t in tasks}, evaluate)


def build(config, model_config, tokenizer, seed: int) -> TaskSet:
    """The ``TaskSet`` of ``seed`` (module doc)."""
    return (_real if is_real(config) else _synthetic)(config, model_config, tokenizer, seed)
