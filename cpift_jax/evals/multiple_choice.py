"""Multiple choice (LogiQA, ARC, logical deduction): option log-likelihoods, and letter answers.

**Log-likelihood** (``evaluate``), as evaluation harnesses score multiple choice: for a record
with ``meta["question"]``, ``meta["options"]`` and ``meta["gold"]`` (``cpift_jax.data.readers``),
the context is ``"Question: <question>\\nAnswer:"`` and option ``k``'s continuation is
``" <option k>"`` (``harness_prompt``; pass ``prompt_fn`` for another format). With ``x`` the
tokens of context + continuation (the tokenizer's BOS first when it adds one) and ``C`` the
positions of the continuation tokens (the tokens past the context's own tokenization),

    LL_k = sum_{i in C} log p(x_i | x_<i)

and three predictions are scored against the gold option:

* ``accuracy``: ``argmax_k LL_k`` (unnormalised; favours short options);
* ``accuracy_per_char``: ``argmax_k LL_k / len(continuation_k)`` in characters, leading space
  included (lm-evaluation-harness's ``acc_norm``, OLMES's per-character normalisation);
* ``accuracy_per_token``: ``argmax_k LL_k / |C_k|``.

Ties go to the lowest option index. All (record, option) rows are scored by
``heldout.sequence_nll``: batched, one compiled program per (batch, width), on any sharding.

**Letter answers** (``evaluate_letters``): the reply to the record's own prompt (which lists the
options as ``A. ...``, ``B. ...``; the readers' format) is generated greedily
(``math.generate_replies``); the predicted option is the first standalone capital letter among
the record's option letters (A-E for five options) in the reply (``first_letter``: "B",
"(B)", "B. Paris", "The answer is B" -> B; the "A" in "Answer" is not standalone). A reply
without one is wrong.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cpift_jax import models
from cpift_jax.data.readers import LETTERS
from cpift_jax.evals import heldout
from cpift_jax.evals import math as math_eval

__all__ = ["ChoiceResult", "LetterResult", "harness_prompt", "encode_options", "loglikelihoods",
           "evaluate", "first_letter", "evaluate_letters"]

Pytree = Any


def _check_record(record) -> tuple[list[str], int]:
    meta = record.meta
    options, gold = meta.get("options"), meta.get("gold")
    if not isinstance(options, list) or len(options) < 2 or not all(
            isinstance(o, str) for o in options):
        raise ValueError(f"record {record.id!r}: meta['options'] must be a list of at least two "
                         f"strings, got {options!r}")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(options):
        raise ValueError(f"record {record.id!r}: meta['gold'] must be an option index in "
                         f"[0, {len(options)}), got {gold!r}")
    return options, gold


def harness_prompt(record) -> tuple[str, list[str]]:
    """``("Question: <q>\\nAnswer:", [" <option>", ...])`` from ``meta`` (module doc)."""
    options, _ = _check_record(record)
    question = record.meta.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"record {record.id!r}: meta['question'] must be a non-empty string")
    return f"Question: {question.strip()}\nAnswer:", [" " + o for o in options]


def _plain_ids(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode_prompt"):  # the project's Tokenizer protocol: no specials
        return list(tokenizer.encode(text))
    return list(tokenizer.encode(text, add_special_tokens=False))


def _prefix_ids(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before any text (BOS, when it adds one)."""
    if hasattr(tokenizer, "bos_id"):
        return [int(tokenizer.bos_id)]
    hf = getattr(tokenizer, "hf", tokenizer)
    return [int(i) for i in hf("")["input_ids"]]


def encode_options(tokenizer, context: str, continuations: Sequence[str], *, name: str = "record"
                   ) -> list[tuple[list[int], int]]:
    """Per continuation: ``(tokens, start)``, the tokens of prefix + context + continuation and
    the index of the first continuation token (context tokenized alone; the rest is the
    continuation, so a token merging across the boundary counts as continuation)."""
    prefix = _prefix_ids(tokenizer)
    start = len(prefix) + len(_plain_ids(tokenizer, context))
    if start == 0:
        raise ValueError(f"{name}: the context has no tokens; the first continuation token "
                         "would have nothing to be predicted from")
    rows = []
    for k, continuation in enumerate(continuations):
        tokens = prefix + _plain_ids(tokenizer, context + continuation)
        if len(tokens) <= start:
            raise ValueError(f"{name}: option {k} ({continuation!r}) adds no tokens to the "
                             "context")
        rows.append((tokens, start))
    return rows


def loglikelihoods(model_config: models.ModelConfig, params: Pytree, tokenizer,
                   records: Sequence, *, prompt_fn: Callable = harness_prompt,
                   batch_size: int = 16, vocab_chunk: int = 0
                   ) -> tuple[list[list[float]], list[list[int]], list[list[int]]]:
    """Per record and option: ``LL_k`` (float, nats), continuation characters, continuation
    tokens. ``prompt_fn(record) -> (context, continuations)``."""
    if not records:
        raise ValueError("loglikelihoods needs at least one record")
    rows, chars, owner = [], [], []
    for r in records:
        context, continuations = prompt_fn(r)
        encoded = encode_options(tokenizer, context, continuations, name=f"record {r.id!r}")
        rows.extend(encoded)
        chars.append([len(c) for c in continuations])
        owner.append(len(encoded))
    width = -(-max(len(t) for t, _ in rows) // 16) * 16  # nearby lengths share one program
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, (row, start) in enumerate(rows):
        tokens[i, : len(row)] = row
        mask[i, start: len(row)] = True
    nll = heldout.sequence_nll(model_config, params, tokens, mask, batch_size=batch_size,
                               vocab_chunk=vocab_chunk)
    counts = mask.sum(axis=1)
    lls, ntok, offset = [], [], 0
    for n in owner:
        lls.append((-nll[offset: offset + n]).tolist())
        ntok.append(counts[offset: offset + n].astype(int).tolist())
        offset += n
    return lls, chars, ntok


@dataclasses.dataclass(frozen=True)
class ChoiceResult:
    """Accuracies (module doc) and, per record in input order, the option log-likelihoods and
    the option each rule picked."""

    accuracy: float
    accuracy_per_char: float
    accuracy_per_token: float
    ids: list[str]
    loglikelihoods: list[list[float]]
    gold: list[int]
    predicted: list[int]
    predicted_per_char: list[int]
    predicted_per_token: list[int]

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "accuracy_per_char": self.accuracy_per_char,
                "accuracy_per_token": self.accuracy_per_token}


def evaluate(model_config: models.ModelConfig, params: Pytree, tokenizer, records: Sequence, *,
             prompt_fn: Callable = harness_prompt, batch_size: int = 16,
             vocab_chunk: int = 0) -> ChoiceResult:
    """Log-likelihood multiple-choice accuracy, raw and length-normalised (module doc)."""
    gold = [_check_record(r)[1] for r in records]
    lls, chars, ntok = loglikelihoods(model_config, params, tokenizer, records,
                                      prompt_fn=prompt_fn, batch_size=batch_size,
                                      vocab_chunk=vocab_chunk)
    # np.argmax returns the first maximum: ties go to the lowest option index.
    raw = [int(np.argmax(ll)) for ll in lls]
    per_char = [int(np.argmax(np.divide(ll, c))) for ll, c in zip(lls, chars)]
    per_token = [int(np.argmax(np.divide(ll, t))) for ll, t in zip(lls, ntok)]

    def accuracy(predicted):
        return float(np.mean([p == g for p, g in zip(predicted, gold)]))

    return ChoiceResult(accuracy(raw), accuracy(per_char), accuracy(per_token),
                        ids=[r.id for r in records], loglikelihoods=lls, gold=gold,
                        predicted=raw, predicted_per_char=per_char, predicted_per_token=per_token)


def first_letter(text: str, num_options: int) -> int | None:
    """Index of the first standalone option letter (``LETTERS[:num_options]``) in ``text``."""
    letters = LETTERS[:num_options]
    match = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    return None if match is None else letters.index(match.group(1))


@dataclasses.dataclass(frozen=True)
class LetterResult:
    """``accuracy`` of the letter answers; per record the reply, the option it names (None: no
    option letter) and the gold option."""

    accuracy: float
    unfinished: int
    ids: list[str]
    predictions: list[str]
    chosen: list[int | None]
    gold: list[int]
    correct: list[bool]


def evaluate_letters(model_config: models.ModelConfig, params: Pytree, tokenizer,
                     records: Sequence, *, max_new_tokens: int = 8, batch_size: int = 32,
                     eos_ids: Sequence[int] | None = None,
                     generate_fn: Callable | None = None) -> LetterResult:
    """Accuracy of generated letter answers (module doc); ``generate_fn`` as in
    ``math.generate_replies``."""
    checked = [_check_record(r) for r in records]
    replies = math_eval.generate_replies(model_config, params, tokenizer, records,
                                         max_new_tokens=max_new_tokens, batch_size=batch_size,
                                         eos_ids=eos_ids, generate_fn=generate_fn)
    chosen = [first_letter(t, len(options)) for t, (options, _) in zip(replies.texts, checked)]
    gold = [g for _, g in checked]
    correct = [c is not None and c == g for c, g in zip(chosen, gold)]
    return LetterResult(float(np.mean(correct)), sum(not f for f in replies.finished),
                        ids=[r.id for r in records], predictions=replies.texts, chosen=chosen,
                        gold=gold, correct=correct)
