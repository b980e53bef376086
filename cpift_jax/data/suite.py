"""The synthetic task suite: examples per task from a seed, held-out splits, knobs, metric.

An example is ``(task, prompt, answer, key)``; ``key`` is the digit payload the answer is
computed from (see ``cpift_jax.data.tasks``). Knobs (``default_config()``), all aimed at the
question *when does isolating parameters beat mixing them?*:

* ``tag``: how strongly a prompt names its task. ``"none"``: not at all; ``"weak"``: one tag
  token in front (``<arith>372``); ``"strong"``: the tag, the task's instruction words and the
  tag again right before the answer (``<arith>Math: 372<arith>``).
* ``similarity`` in [0, 1]: the probability that a prompt is the *bare* payload instead of the
  task's domain-styled one. Bare prompts are the same input for every task with a different
  answer per task, i.e. conflicting mappings, separable only through the tag.
* ``min_digits`` / ``max_digits``: difficulty (payload length, uniform in the range).
* ``mixture`` / ``imbalance``: per-task sampling weights of a multi-task mixture (see
  ``mixture_weights``).
* ``test_fraction``: share of payloads reserved for held-out evaluation.

Held-out split: a payload belongs to the test split iff ``blake2b(key) < test_fraction`` (as a
fraction of 2**64), so the split does not depend on the seed or the task and no test payload
ever appears in training, under any task. Train examples are drawn i.i.d. (repeats allowed, as
in multi-epoch SFT); test examples have distinct payloads.

Metric: exact match of the stripped strings. ``chance_level`` states the score of the best
constant answer; at the default difficulty it is 0.065 for arith (sums
pile up in the middle), 0.043 for logic and below 0.005 for the others.
"""

from __future__ import annotations

import hashlib
import numbers
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import ml_collections
import numpy as np

from cpift_jax.data import tasks as tasks_lib
from cpift_jax.data.tokenizer import tag_text

__all__ = [
    "Example",
    "TAG_STRENGTHS",
    "SPLITS",
    "default_config",
    "check_config",
    "render_prompt",
    "generate",
    "make_suite",
    "exact_match",
    "score",
    "chance_level",
    "mixture_weights",
    "is_test_key",
]

TAG_STRENGTHS = ("none", "weak", "strong")
SPLITS = ("train", "test")


class Example(NamedTuple):
    task: str
    prompt: str
    answer: str
    key: str  # the digit payload; decides the split


def default_config() -> ml_collections.ConfigDict:
    """Suite knobs (module docstring). Defaults: the five domain tasks, weak tags, no bare
    prompts, 3-5 digits, balanced mixture, 20% of payloads held out."""
    c = ml_collections.ConfigDict()
    c.tasks = tasks_lib.DEFAULT_TASKS
    c.tag = "weak"
    c.similarity = 0.0
    c.min_digits = 3
    c.max_digits = 5
    c.mixture = ()  # per-task weights aligned with `tasks`; () = use `imbalance`
    c.imbalance = 1.0  # weight ratio first task : last task, geometric in between; 1 = balanced
    c.test_fraction = 0.2
    return c


def _get(config, name):
    if not hasattr(config, name):
        raise ValueError(f"suite config has no field '{name}' (see suite.default_config())")
    return getattr(config, name)


def check_config(config) -> None:
    """ValueError naming the first bad suite-config field."""
    names = tuple(_get(config, "tasks"))
    if not names:
        raise ValueError("suite config 'tasks' is empty")
    for name in names:
        tasks_lib.get_module(name)
    if len(set(names)) != len(names):
        raise ValueError(f"suite config 'tasks' has duplicates: {names}")
    if _get(config, "tag") not in TAG_STRENGTHS:
        raise ValueError(f"suite config 'tag' must be one of {TAG_STRENGTHS}, got {config.tag!r}")
    sim = _get(config, "similarity")
    if not (isinstance(sim, numbers.Real) and 0.0 <= sim <= 1.0):
        raise ValueError(f"suite config 'similarity' must be in [0, 1], got {sim!r}")
    lo, hi = _get(config, "min_digits"), _get(config, "max_digits")
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi <= 18):
        raise ValueError(
            f"suite config 'min_digits'/'max_digits' must be ints with 1 <= min <= max <= 18, "
            f"got {lo!r}/{hi!r}"
        )
    frac = _get(config, "test_fraction")
    if not (isinstance(frac, numbers.Real) and 0.0 < frac < 1.0):
        raise ValueError(f"suite config 'test_fraction' must be in (0, 1), got {frac!r}")
    mixture_weights(config)


def mixture_weights(config) -> dict[str, float]:
    """Task -> sampling probability of a multi-task mixture.

    ``mixture`` (one non-negative weight per task, normalised) wins when given; otherwise
    ``imbalance = r`` gives task i of n the weight ``r ** (-i / (n - 1))``: the first task is
    ``r`` times as frequent as the last. Setting both is an error.
    """
    names = tuple(_get(config, "tasks"))
    weights = tuple(_get(config, "mixture") or ())
    r = _get(config, "imbalance")
    if not (isinstance(r, numbers.Real) and r >= 1.0):
        raise ValueError(f"suite config 'imbalance' must be a number >= 1, got {r!r}")
    if weights:
        if r != 1.0:
            raise ValueError("suite config sets both 'mixture' and 'imbalance'; use one")
        if len(weights) != len(names) or any(not (w >= 0) for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"suite config 'mixture' needs {len(names)} non-negative weights (one per task "
                f"in {names}) with a positive sum, got {weights!r}"
            )
    else:
        n = len(names)
        weights = tuple(float(r) ** (-i / max(n - 1, 1)) for i in range(n))
    total = float(sum(weights))
    return {name: float(w) / total for name, w in zip(names, weights)}


def is_test_key(key: str, test_fraction: float) -> bool:
    """Whether payload ``key`` is held out (a hash bucket; the same in every process)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h < test_fraction * 2.0**64


def render_prompt(task: str, body: str, tag: str) -> str:
    """``body`` with the task tag at the given strength (module docstring)."""
    if tag == "none":
        return body
    if tag == "weak":
        return tag_text(task) + body
    if tag == "strong":
        title = tasks_lib.get_module(task).TITLE
        return f"{tag_text(task)}{title}: {body}{tag_text(task)}"
    raise ValueError(f"tag must be one of {TAG_STRENGTHS}, got {tag!r}")


def _rng(seed: int, task: str, split: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(task.encode()), SPLITS.index(split)])


def _payload_count(config, split: str) -> float:
    frac = config.test_fraction if split == "test" else 1.0 - config.test_fraction
    return frac * sum(10.0**n for n in range(config.min_digits, config.max_digits + 1))


def generate(task: str, seed: int, n: int, *, split: str = "train", config=None) -> list[Example]:
    """``n`` examples of ``task`` from ``split``, a pure function of (task, seed, n, split, config).

    Train examples are i.i.d. draws; test examples have distinct payloads, and asking for more
    than half the test payloads that exist raises ValueError (raise ``max_digits`` or
    ``test_fraction``, or ask for fewer).
    """
    config = default_config() if config is None else config
    check_config(config)
    module = tasks_lib.get_module(task)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    available = _payload_count(config, split)
    if split == "test" and n > available / 2:
        raise ValueError(
            f"task {task!r}: asked for {n} distinct {split} examples but only about "
            f"{available:.0f} {split} payloads exist with {config.min_digits}-"
            f"{config.max_digits} digits and test_fraction={config.test_fraction} (at most half "
            "can be drawn); raise max_digits or ask for fewer"
        )
    if available < 1:
        raise ValueError(f"task {task!r}: the {split} split is empty at this difficulty")
    rng = _rng(seed, task, split)
    want_test = split == "test"
    seen, out = set(), []
    while len(out) < n:
        length = int(rng.integers(config.min_digits, config.max_digits + 1))
        key = "".join(str(d) for d in rng.integers(10, size=length))
        if is_test_key(key, config.test_fraction) != want_test or (want_test and key in seen):
            continue
        seen.add(key)
        body = key if rng.random() < config.similarity else module.native(key, rng)
        out.append(Example(task, render_prompt(task, body, config.tag), module.answer(key), key))
    return out


def make_suite(config, seed: int, n_train: int, n_test: int) -> dict[str, dict[str, list]]:
    """``{task: {"train": [...n_train], "test": [...n_test]}}`` for every task in the config."""
    check_config(config)
    return {
        name: {
            "train": generate(name, seed, n_train, split="train", config=config),
            "test": generate(name, seed, n_test, split="test", config=config),
        }
        for name in config.tasks
    }


def exact_match(prediction: str, answer: str) -> float:
    """1.0 iff the strings are equal after stripping surrounding whitespace."""
    return float(prediction.strip() == answer.strip())


def score(task: str, predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Mean exact match of a task's predictions (every task uses exact match)."""
    tasks_lib.get_module(task)
    if len(predictions) != len(answers) or not answers:
        raise ValueError(
            f"task {task!r}: need as many predictions as answers (and at least one), got "
            f"{len(predictions)} and {len(answers)}"
        )
    return float(np.mean([exact_match(p, a) for p, a in zip(predictions, answers)]))


def chance_level(task: str, config=None, *, samples: int = 20000) -> float:
    """Exact-match score of the best constant answer (the most frequent test answer), estimated
    from ``samples`` test payloads drawn with a fixed seed."""
    config = default_config() if config is None else config
    check_config(config)
    module = tasks_lib.get_module(task)
    rng = np.random.default_rng(0)
    counts = Counter()
    for _ in range(samples):
        length = int(rng.integers(config.min_digits, config.max_digits + 1))
        counts[module.answer("".join(str(d) for d in rng.integers(10, size=length)))] += 1
    return counts.most_common(1)[0][1] / samples
