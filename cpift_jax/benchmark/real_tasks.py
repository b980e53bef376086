"""Real SFT tasks for the benchmark: records, splits, samples, token rows and per-task metrics.

``config.data.tasks`` names each task (``task_config`` gives the fields):

* ``source``: a dataset of ``cpift_jax.data.fetch`` (``gsm8k``, ``mbpp``, ...) or a file path
  (``~`` and ``$VARS`` expanded; an unset variable is an error naming the key);
* ``reader`` / ``layout``: ``cpift_jax.data.readers`` names; empty = the fetched dataset's own
  (a file path needs ``reader``; its layout defaults to ``plain``);
* ``test_source`` (+ ``test_reader``, ``test_layout``): where the held-out records come from;
  empty = the ``source`` records whose id hashes into the test split (``readers.is_test`` with
  ``data.test_fraction``), the rest being the training pool;
* ``metric``: ``math`` (exact match of the final number of a greedy reply), ``multiple_choice``
  (option log-likelihood accuracy, per character by default: ``eval.choice_normalization``),
  ``code`` (pass@1 in the sandbox with ``eval.allow_code_execution``, otherwise as ``heldout``),
  ``heldout`` (held-out bits per byte ``b`` of the reference answers, reported as ``2 ** -b``,
  the geometric-mean probability per byte: in (0, 1], higher is better);
* ``max_new_tokens``: the generation budget of ``math`` and ``code``.

Samples: the test set of a task is ``data.n_test`` records of its test pool (all of them when
fewer exist) in a fixed order (seed 0), the same for every seed, so every method and seed is
scored on the same examples; the training sample is ``data.n_train`` records of the training pool
in a seeded order. A conversation longer than ``data.seq_len`` tokens keeps its longest prefix
that ends with an assistant turn and fits (``fit_record``); a record whose first reply does not fit
is skipped and counted in the log. Rows are packed with document boundaries
(``cpift_jax.data.packing``) when ``data.pack`` is set, else one conversation per row.

Every task needs a tokenizer with a chat template (``cpift_jax.data.chat``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from cpift_jax.data import chat, fetch, readers

__all__ = ["METRICS", "CHOICE_NORMALIZATIONS", "TaskData", "TaskScore", "task_config",
           "eval_config", "task_names", "check_config", "fit_record", "load", "train_arrays",
           "evaluate", "metric_label"]

METRICS = ("math", "multiple_choice", "code", "heldout")
CHOICE_NORMALIZATIONS = {"none": "accuracy", "per_char": "accuracy_per_char",
                         "per_token": "accuracy_per_token"}
TEST_ORDER_SEED = 0  # the held-out sample does not depend on the run's seed

Pytree = Any


def task_config(source: str, metric: str, **overrides) -> ml_collections.ConfigDict:
    """One task's fields (module doc) with their defaults."""
    c = ml_collections.ConfigDict(dict(
        source=source, reader="", layout="", test_source="", test_reader="", test_layout="",
        metric=metric, max_new_tokens=256))
    c.update(overrides)
    return c


def eval_config() -> ml_collections.ConfigDict:
    """``config.eval``: how the real tasks are scored (docs/evaluation.md)."""
    c = ml_collections.ConfigDict()
    # Running model-written programs is opt-in; without it the code task is scored by held-out
    # bits per byte of the reference solutions.
    c.allow_code_execution = False
    c.code_timeout_s = 10.0
    c.choice_normalization = "per_char"  # none | per_char | per_token (CHOICE_NORMALIZATIONS)
    c.batch_size = 8  # rows per evaluation program (generation and log-likelihood)
    return c


def task_names(config) -> tuple[str, ...]:
    return tuple(config.data.tasks.keys())


def _fail(key: str, problem: str):
    raise ValueError(f"config '{key}' {problem}")


def _resolve(spec, prefix: str, key: str) -> tuple[Path, str, str]:
    """``(path, reader, layout)`` of a task's ``source`` or ``test_source`` (module doc)."""
    source = spec[prefix + "source"]
    reader, layout = spec[prefix + "reader"], spec[prefix + "layout"]
    if source in fetch.DATASETS:
        dataset = fetch.DATASETS[source]
        try:
            path = fetch.path(source)
        except FileNotFoundError as err:
            _fail(key + prefix + "source", f"names dataset {source!r}, which is not fetched: {err}")
        return path, reader or dataset.reader, layout or dataset.layout
    expanded = os.path.expandvars(os.path.expanduser(source))
    if "$" in expanded:
        _fail(key + prefix + "source", f"= {source!r} uses an environment variable that is not "
              "set")
    if not reader:
        _fail(key + prefix + "reader", f"is empty; a file source ({source!r}) needs one of "
              f"{sorted(readers.READERS)}")
    if not Path(expanded).is_file():
        _fail(key + prefix + "source", f"= {source!r} is neither a dataset of "
              f"cpift_jax.data.fetch ({sorted(fetch.DATASETS)}) nor an existing file")
    return Path(expanded), reader, layout or "plain"


def check_config(config) -> None:
    """ValueError naming the first bad key of ``config.data.tasks`` / ``config.eval``."""
    tasks = config.data.tasks
    if not tasks:
        _fail("data.tasks", "is empty")
    for name in tasks:
        spec, key = tasks[name], f"data.tasks.{name}."
        if spec.metric not in METRICS:
            _fail(key + "metric", f"must be one of {METRICS}, got {spec.metric!r}")
        if not spec.source:
            _fail(key + "source", "is empty")
        _resolve(spec, "", key)
        if spec.test_source:
            _resolve(spec, "test_", key)
        for prefix in ("", "test_"):
            if spec[prefix + "reader"] and spec[prefix + "reader"] not in readers.READERS:
                _fail(key + prefix + "reader", f"must be one of {sorted(readers.READERS)}")
    if config.eval.choice_normalization not in CHOICE_NORMALIZATIONS:
        _fail("eval.choice_normalization", f"must be one of {sorted(CHOICE_NORMALIZATIONS)}")
    if not 0.0 < config.data.test_fraction < 1.0:
        _fail("data.test_fraction", f"must be in (0, 1), got {config.data.test_fraction}")


def metric_label(spec, eval_cfg) -> str:
    """What a task's score means, for reports."""
    if spec.metric == "code" and not eval_cfg.allow_code_execution:
        return "2^-bits/byte (code execution off)"
    return {"math": "exact match", "multiple_choice": f"accuracy ({eval_cfg.choice_normalization})",
            "code": "pass@1", "heldout": "2^-bits/byte"}[spec.metric]


# ------------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One task's records: the training sample and the held-out set, fitted to ``seq_len``."""

    name: str
    metric: str
    train: list[readers.Record]
    test: list[readers.Record]


def fit_record(tokenizer, record: readers.Record, seq_len: int) -> readers.Record | None:
    """``record`` cut after its last assistant turn such that the conversation so far, rendered
    and tokenized as for training (``chat.token_ids``), has at most ``seq_len`` tokens (itself
    when it fits); None when even its first reply does not fit. The token count grows with
    every turn, so the cut is found by bisection over the assistant turns."""
    def length(messages) -> int:
        return len(chat.token_ids(tokenizer, messages, name=f"record {record.id!r}")[0])

    if length(record.messages) <= seq_len:
        return record
    ends = [i + 1 for i, m in enumerate(record.messages) if m["role"] == "assistant"]
    lo, hi = -1, len(ends) - 1  # ends[hi] is known too long; ends[lo] fits (-1: none yet)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if length(record.messages[: ends[mid]]) <= seq_len:
            lo = mid
        else:
            hi = mid
    if lo < 0:
        return None
    return dataclasses.replace(record, messages=record.messages[: ends[lo]])


def _fitted(tokenizer, pool: Sequence, n: int, seq_len: int, seed: int, what: str) -> list:
    """Up to ``n`` records of ``pool`` in a seeded order, each fitted; skipped ones are logged."""
    out, skipped = [], 0
    for record in readers.sample(pool, None, seed):
        if len(out) == n:
            break
        fitted = fit_record(tokenizer, record, seq_len)
        if fitted is None:
            skipped += 1
        else:
            out.append(fitted)
    if skipped:
        logging.info("%s: skipped %d records whose first reply does not fit in %d tokens",
                     what, skipped, seq_len)
    if not out:
        raise ValueError(f"{what}: no record fits in data.seq_len = {seq_len} tokens")
    if len(out) < n:
        logging.info("%s: %d records (asked for %d; that is all there are)", what, len(out), n)
    return out


def load(config, tokenizer, seed: int) -> dict[str, TaskData]:
    """``{task: TaskData}`` for ``config.data.tasks`` (module doc)."""
    d = config.data
    out = {}
    for name in d.tasks:
        spec, key = d.tasks[name], f"data.tasks.{name}."
        path, reader, layout = _resolve(spec, "", key)
        records = readers.read(path, reader, layout=layout)
        if spec.test_source:
            test_path, test_reader, test_layout = _resolve(spec, "test_", key)
            train_pool, test_pool = records, readers.read(test_path, test_reader,
                                                          layout=test_layout)
        else:
            train_pool = readers.split(records, "train", d.test_fraction)
            test_pool = readers.split(records, "test", d.test_fraction)
        test = _fitted(tokenizer, test_pool, d.n_test, d.seq_len, TEST_ORDER_SEED,
                       f"task {name!r} (test)")
        train = _fitted(tokenizer, train_pool, d.n_train, d.seq_len, seed,
                        f"task {name!r} (train)")
        out[name] = TaskData(name, spec.metric, train, test)
    return out


def train_arrays(tokenizer, data: Mapping[str, TaskData], seq_len: int, *,
                 pack: bool) -> dict[str, dict[str, np.ndarray]]:
    """Token rows per task (``batching``'s arrays): packed with document boundaries, or one
    conversation per row."""
    out = {}
    for name, task in data.items():
        names = [f"task {name!r} record {r.id!r}" for r in task.train]
        messages = [r.messages for r in task.train]
        if pack:
            from cpift_jax.data import packing
            docs = [chat.token_ids(tokenizer, m, name=n) for m, n in zip(messages, names)]
            packed = packing.pack(docs, seq_len)
            logging.info("task %r: %d conversations packed into %d rows (%.0f%% of tokens used)",
                         name, len(docs), packed["tokens"].shape[0],
                         100 * packing.efficiency(packed))
            out[name] = packed
        else:
            out[name] = chat.encode_chats(tokenizer, messages, seq_len, names=names)
    return out


# ----------------------------------------------------------------------------------- metrics


@dataclasses.dataclass(frozen=True)
class TaskScore:
    """A task's score (higher is better) and the per-example values it averages."""

    score: float
    per_example: list[float]


def _eos_ids(tokenizer) -> list[int]:
    hf = getattr(tokenizer, "hf", tokenizer)
    ids = {int(hf.eos_token_id)}
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>"):
        tid = hf.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != hf.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(ids)


def _heldout(model_config, params, tokenizer, records, seq_len, batch_size) -> TaskScore:
    """``2 ** -bits_per_byte`` of the pooled records (the geometric-mean probability per byte of
    the references, in (0, 1], higher is better); per example the same of each record."""
    from cpift_jax.evals import heldout
    r = heldout.evaluate(model_config, params, tokenizer, records, seq_len=seq_len,
                         batch_size=batch_size)
    per = [float(2.0 ** (-nll / np.log(2) / b)) for nll, b in zip(r.nll, r.bytes)]
    return TaskScore(float(2.0 ** -r.bits_per_byte), per)


def evaluate_task(model_config, params, tokenizer, task: TaskData, spec, eval_cfg,
                  seq_len: int) -> TaskScore:
    """One task's score with its metric (module doc)."""
    from cpift_jax.evals import math as math_eval
    from cpift_jax.evals import multiple_choice, pass_at_1

    batch = eval_cfg.batch_size
    if task.metric == "math":
        r = math_eval.evaluate(model_config, params, tokenizer, task.test,
                               max_new_tokens=spec.max_new_tokens, batch_size=batch,
                               eos_ids=_eos_ids(tokenizer))
        return TaskScore(r.score, [float(c) for c in r.correct])
    if task.metric == "multiple_choice":
        r = multiple_choice.evaluate(model_config, params, tokenizer, task.test, batch_size=batch)
        field = CHOICE_NORMALIZATIONS[eval_cfg.choice_normalization]
        predicted = {"accuracy": r.predicted, "accuracy_per_char": r.predicted_per_char,
                     "accuracy_per_token": r.predicted_per_token}[field]
        return TaskScore(getattr(r, field), [float(p == g) for p, g in zip(predicted, r.gold)])
    if task.metric == "code" and eval_cfg.allow_code_execution:
        r = pass_at_1.evaluate(model_config, params, tokenizer, task.test,
                               max_new_tokens=spec.max_new_tokens, batch_size=batch,
                               timeout_s=eval_cfg.code_timeout_s, eos_ids=_eos_ids(tokenizer))
        return TaskScore(r.score, [float(p) for p in r.passed])
    return _heldout(model_config, params, tokenizer, task.test, seq_len, batch)


def evaluate(model_config, params, tokenizer, data: Mapping[str, TaskData], config,
             tasks: Sequence[str]) -> dict[str, TaskScore]:
    """``{task: TaskScore}`` for ``tasks`` on their held-out records."""
    return {t: evaluate_task(model_config, params, tokenizer, data[t], config.data.tasks[t],
                             config.eval, config.data.seq_len) for t in tasks}
