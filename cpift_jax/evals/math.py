"""Math word problems (GSM8K): greedy generation, final-number extraction, exact match.

Each record (``cpift_jax.data.readers.Record``; ``meta["answer"]`` the reference number) is
prompted with its conversation up to its last assistant turn, rendered by the tokenizer's chat
template with the generation prompt when it has one (as the model was fine-tuned), else through
the project tokenizer's ``encode_prompt`` (one user turn). Replies are generated greedily with
``cpift_jax.models.generate`` (KV cache), in batches of one shape: prompts right-padded to one
width (a multiple of 16), the last batch filled with copies of a prompt. A reply is its tokens up
to the first end token; a row that emits none within ``max_new_tokens`` keeps the whole budget and
is counted in ``unfinished`` (it is still scored: a long worked answer cut short has no final
number after ``####`` and rarely ends on the right one).

Extraction (``extract_answer``): the number after ``####``, else the last number in the text
(``cpift_jax.data.readers.final_number``), then ``normalize_number``: no thousands separators,
no leading zeros, no trailing fractional zeros (``"1,234.50"`` -> ``"1234.5"``, ``"12.0"`` ->
``"12"``, ``"-0"`` -> ``"0"``). A prediction is correct iff its normalised number equals the
normalised reference, as strings (no numeric tolerance).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from cpift_jax import models
from cpift_jax.data import readers

__all__ = ["Replies", "MathResult", "chat_tokenizer", "prompt_ids", "generate_replies",
           "normalize_number", "extract_answer", "evaluate"]

Pytree = Any


def chat_tokenizer(tokenizer):
    """The ``transformers`` tokenizer behind ``tokenizer`` when it has a chat template."""
    hf = getattr(tokenizer, "hf", tokenizer)
    return hf if getattr(hf, "chat_template", None) else None


def prompt_ids(tokenizer, messages: Sequence[dict], *, name: str = "record") -> list[int]:
    """Token ids the model is shown before it replies: ``messages`` up to (excluding) the last
    assistant turn, with the chat template's generation prompt (module doc)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    shown = list(messages[:last] if last is not None else messages)
    if not shown or shown[-1].get("role") != "user":
        raise ValueError(f"{name}: the prompt must end with a user turn, got roles "
                         f"{[m.get('role') for m in shown]}")
    hf = chat_tokenizer(tokenizer)
    if hf is not None:
        text = hf.apply_chat_template(shown, tokenize=False, add_generation_prompt=True)
        return list(hf(text, add_special_tokens=False)["input_ids"])
    if len(shown) != 1 or not hasattr(tokenizer, "encode_prompt"):
        raise ValueError(f"{name}: a tokenizer without a chat template can only prompt with one "
                         f"user turn through encode_prompt, got roles {[m['role'] for m in shown]}")
    return list(tokenizer.encode_prompt(shown[0]["content"]))


def _eos_ids(tokenizer) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no end token (eos_id / eos_token_id); pass eos_ids")
    return (int(eos),)


def _decode(tokenizer, ids) -> str:
    if hasattr(tokenizer, "encode_prompt"):  # the project's Tokenizer protocol drops specials
        return tokenizer.decode(ids)
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


@dataclasses.dataclass(frozen=True)
class Replies:
    """Generated replies in record order: ``texts`` (up to the first end token) and whether each
    row emitted an end token within the budget (``finished``)."""

    texts: list[str]
    finished: list[bool]


def generate_replies(model_config: models.ModelConfig, params: Pytree, tokenizer,
                     records: Sequence, *, max_new_tokens: int, batch_size: int = 32,
                     eos_ids: Sequence[int] | None = None,
                     generate_fn: Callable | None = None) -> Replies:
    """Greedy replies to each record's prompt (module doc).

    ``generate_fn`` has ``cpift_jax.models.generate``'s signature (the default); tests pass an
    oracle. ``eos_ids``: the tokens that end a reply (default: the tokenizer's EOS; add a chat
    template's end-of-turn token when it differs).
    """
    generate_fn = models.generate if generate_fn is None else generate_fn
    if not records:
        raise ValueError("generate_replies needs at least one record")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = tuple(int(e) for e in eos_ids) if eos_ids is not None else _eos_ids(tokenizer)
    if not eos:
        raise ValueError("eos_ids must name at least one token")
    ids = [prompt_ids(tokenizer, r.messages, name=f"record {r.id!r}") for r in records]
    lengths = np.array([len(x) for x in ids], np.int32)
    width = -(-int(lengths.max()) // 16) * 16  # nearby prompt lengths share one program
    n = len(ids)
    padded = -(-n // batch_size) * batch_size
    tokens = np.zeros((padded, width), np.int32)
    for i in range(padded):
        row = ids[min(i, n - 1)]  # filler rows repeat the last prompt
        tokens[i, : len(row)] = row
    lengths = np.concatenate([lengths, np.repeat(lengths[-1:], padded - n)])
    outputs = []
    for start in range(0, padded, batch_size):
        stop = start + batch_size
        out = generate_fn(model_config, params, tokens[start:stop], lengths[start:stop],
                          max_new_tokens, eos_id=eos)
        outputs.append(np.asarray(jax.device_get(out)))
    generated = np.concatenate(outputs)[:n]
    texts, finished = [], []
    for row in generated:
        hits = np.flatnonzero(np.isin(row, eos))
        end = int(hits[0]) if hits.size else len(row)
        texts.append(_decode(tokenizer, row[:end]))
        finished.append(bool(hits.size))
    return Replies(texts, finished)


_PLAIN_NUMBER = re.compile(r"(-?)(\d+)(?:\.(\d+))?")


def normalize_number(number: str) -> str:
    """Canonical text of a decimal number (module doc); ValueError if ``number`` is not one."""
    match = _PLAIN_NUMBER.fullmatch(number.strip().replace(",", ""))
    if match is None:
        raise ValueError(f"not a decimal number: {number!r}")
    sign, whole, fraction = match.groups()
    whole = whole.lstrip("0") or "0"
    fraction = (fraction or "").rstrip("0")
    text = whole + ("." + fraction if fraction else "")
    return text if text == "0" or not sign else "-" + text


def extract_answer(text: str) -> str | None:
    """The normalised final number of ``text`` (module doc); None when it has no number."""
    found = readers.final_number(text)
    return None if found is None else normalize_number(found)


@dataclasses.dataclass(frozen=True)
class MathResult:
    """``score``: the fraction of exactly matched answers; per record (in input order) the
    reply, the extracted number (None: no number), the normalised reference and correctness."""

    score: float
    unfinished: int
    ids: list[str]
    predictions: list[str]
    extracted: list[str | None]
    references: list[str]
    correct: list[bool]


def evaluate(model_config: models.ModelConfig, params: Pytree, tokenizer, records: Sequence, *,
             max_new_tokens: int = 256, batch_size: int = 32,
             eos_ids: Sequence[int] | None = None,
             generate_fn: Callable | None = None) -> MathResult:
    """Exact match of the final number of each greedy reply against ``meta["answer"]``."""
    references = []
    for r in records:
        if "answer" not in r.meta:
            raise ValueError(f"record {r.id!r}: meta has no 'answer' (the reference number); "
                             "read it with the gsm8k reader")
        references.append(normalize_number(str(r.meta["answer"])))
    replies = generate_replies(model_config, params, tokenizer, records,
                               max_new_tokens=max_new_tokens, batch_size=batch_size,
                               eos_ids=eos_ids, generate_fn=generate_fn)
    extracted = [extract_answer(t) for t in replies.texts]
    correct = [e is not None and e == ref for e, ref in zip(extracted, references)]
    return MathResult(score=float(np.mean(correct)),
                      unfinished=sum(not f for f in replies.finished),
                      ids=[r.id for r in records], predictions=replies.texts,
                      extracted=extracted, references=references, correct=correct)
