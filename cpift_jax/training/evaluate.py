"""Evaluation by greedy decoding: each held-out prompt is continued until EOS and scored with its
task's metric (exact match, ``cpift_jax.data.suite.score``).

All prompts of one call are decoded with one prompt width and one token budget, in batches of a
fixed size (the last batch is padded by repeating a prompt), so an evaluation compiles one
program however many tasks it covers. The budget defaults to the longest tokenized answer plus
EOS; a row that has not emitted EOS within its budget scores 0, so an answer cannot be matched
by a truncated longer output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from cpift_jax import models
from cpift_jax.data import batching
from cpift_jax.data import suite as suite_lib
from cpift_jax.data.tokenizer import Tokenizer

__all__ = ["predict", "evaluate", "make_eval_fn"]

Pytree = Any


def predict(
    model_config: models.ModelConfig,
    params: Pytree,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    generate_fn: Callable | None = None,
) -> list[str | None]:
    """Greedy continuation of each prompt, decoded up to (excluding) the first EOS; ``None``
    where no EOS came within ``max_new_tokens``.

    ``generate_fn`` has ``cpift_jax.models.generate``'s signature (the default); tests pass an
    oracle.
    """
    generate_fn = models.generate if generate_fn is None else generate_fn
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens, lengths = batching.encode_prompts(tokenizer, prompts)
    n = len(prompts)
    padded = -(-n // batch_size) * batch_size
    if padded > n:  # repeat the last prompt so every batch has the same shape
        tokens = np.concatenate([tokens, np.repeat(tokens[-1:], padded - n, axis=0)])
        lengths = np.concatenate([lengths, np.repeat(lengths[-1:], padded - n)])
    outputs = []
    for start in range(0, padded, batch_size):
        out = generate_fn(
            model_config, params, tokens[start:start + batch_size],
            lengths[start:start + batch_size], max_new_tokens, eos_id=tokenizer.eos_id,
        )
        outputs.append(np.asarray(jax.device_get(out)))
    generated = np.concatenate(outputs)[:n]
    texts: list[str | None] = []
    for row in generated:
        hits = np.flatnonzero(row == tokenizer.eos_id)
        texts.append(tokenizer.decode(row[: hits[0]]) if hits.size else None)
    return texts


def evaluate(
    model_config: models.ModelConfig,
    params: Pytree,
    tokenizer: Tokenizer,
    examples_by_task: Mapping[str, Sequence],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    generate_fn: Callable | None = None,
    return_predictions: bool = False,
):
    """``{task: score}`` (mean exact match over the task's examples) by greedy decoding.

    ``max_new_tokens=None``: the longest ``encode_answer`` over all examples (answer + EOS).
    With ``return_predictions`` also returns ``{task: [prediction or None, ...]}``.
    """
    names = list(examples_by_task)
    if not names:
        raise ValueError("evaluate needs at least one task")
    for name in names:
        if not examples_by_task[name]:
            raise ValueError(f"task {name!r} has no evaluation examples")
    flat = [(name, ex) for name in names for ex in examples_by_task[name]]
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode_answer(ex.answer)) for _, ex in flat)
    preds = predict(model_config, params, tokenizer, [ex.prompt for _, ex in flat],
                    max_new_tokens=max_new_tokens, batch_size=batch_size,
                    generate_fn=generate_fn)
    by_task: dict[str, list] = {name: [] for name in names}
    for (name, _), p in zip(flat, preds):
        by_task[name].append(p)
    scores = {}
    for name in names:
        answers = [ex.answer for ex in examples_by_task[name]]
        # A missing EOS (None) can never equal an answer: score it against an impossible string.
        texts = [p if p is not None else "\x00" for p in by_task[name]]
        scores[name] = suite_lib.score(name, texts, answers)
    return (scores, by_task) if return_predictions else scores


def make_eval_fn(
    model_config: models.ModelConfig,
    tokenizer: Tokenizer,
    examples_by_task: Mapping[str, Sequence],
    **kwargs,
) -> Callable[[Pytree], dict[str, float]]:
    """``params -> {task: score, ..., "mean": mean score}`` for ``train(eval_fn=...)``."""

    def eval_fn(params):
        scores = evaluate(model_config, params, tokenizer, examples_by_task, **kwargs)
        return {**scores, "mean": float(np.mean(list(scores.values())))}

    return eval_fn
