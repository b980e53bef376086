"""Pretraining data for the toy base model: English that ships with Python, plus easy task text.

* English: the reference-manual topics in ``pydoc_data.topics`` (about 0.46 M characters of
  CPython's own documentation) and the docstrings of a fixed list of standard-library modules
  and their public members, so the corpus is the same on every machine with Python 3.11.
* Easy task text: the suite's prompt formats with 1-2 digit payloads (all tag strengths, bare
  and styled prompts), drawn from the *train* split only, so the base model knows the formats
  and special tokens but has not seen the fine-tuning difficulty.

Both become token rows of ``seq_len`` with a loss on every token (plain language modelling),
in the same ``{"tokens", "loss_mask"}`` layout as SFT rows, so one train step serves both.
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np

from cpift_jax.data import suite as suite_lib
from cpift_jax.data.tokenizer import CHARACTERS, Tokenizer

__all__ = ["sanitize", "english_documents", "easy_task_examples", "pretrain_arrays"]

# Standard-library modules whose docstrings are read (fixed, so the corpus is reproducible).
_MODULES = (
    "argparse", "bisect", "calendar", "collections", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "enum", "fractions", "functools", "heapq", "itertools", "json",
    "logging", "math", "operator", "pathlib", "random", "re", "shutil", "statistics", "string",
    "textwrap", "unittest", "uuid", "zipfile",
)

_REPLACEMENTS = {
    "\t": "    ", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...",
    "\u2013": "-", "\u2014": "--", "\r": "",
}
_ALLOWED = set(CHARACTERS)


def sanitize(text: str) -> str:
    """Maps typographic quotes/dashes/tabs to ASCII and drops any other character outside the
    character vocabulary (newline + printable ASCII): the corpus is English, so what is dropped
    is a handful of symbols (measured: 3 of 0.46 M characters in ``pydoc_data.topics``)."""
    out = []
    for ch in text:
        ch = _REPLACEMENTS.get(ch, ch)
        out.append(ch if len(ch) > 1 or ch in _ALLOWED else "")
    return "".join(out)


def english_documents() -> list[str]:
    """Sanitised English documents, in a fixed order: pydoc topics, then module docstrings."""
    from pydoc_data import topics

    docs = [topics.topics[k] for k in sorted(topics.topics)]
    for name in _MODULES:
        module = importlib.import_module(name)
        docs.append(module.__doc__ or "")
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, attr))
            if doc and len(doc) > 80:
                docs.append(doc)
    return [d for d in (sanitize(x).strip() for x in docs) if d]


def easy_task_examples(suite_config, seed: int, n_per_task: int) -> list:
    """Train-split examples with 1-2 digit payloads, every tag strength, half of them bare."""
    out = []
    for tag in suite_lib.TAG_STRENGTHS:
        config = suite_config.copy_and_resolve_references()
        config.tag, config.similarity, config.min_digits, config.max_digits = tag, 0.5, 1, 2
        for name in config.tasks:
            out += suite_lib.generate(name, seed, max(1, n_per_task // 3), config=config)
    return out


def pretrain_arrays(
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    suite_config,
    seed: int = 0,
    task_fraction: float = 0.3,
) -> dict[str, np.ndarray]:
    """LM rows: documents (``BOS text EOS`` and ``prompt answer`` rows) shuffled with ``seed``,
    concatenated and cut into rows of ``seq_len``; ``task_fraction`` of the tokens are task
    text. ``loss_mask`` is all True (every token is a target)."""
    if not 0.0 <= task_fraction < 1.0:
        raise ValueError(f"task_fraction must be in [0, 1), got {task_fraction}")
    text = [[getattr(tokenizer, "bos_id", tokenizer.eos_id)] + tokenizer.encode(d)
            + [tokenizer.eos_id] for d in english_documents()]
    n_text = sum(len(d) for d in text)
    docs = list(text)
    if task_fraction > 0:
        examples = easy_task_examples(suite_config, seed, 64)
        rows = [tokenizer.encode_prompt(e.prompt) + tokenizer.encode_answer(e.answer)
                for e in examples]
        per_row = float(np.mean([len(r) for r in rows]))
        want = int(n_text * task_fraction / (1.0 - task_fraction) / per_row)
        n_per_task = -(-want // len(suite_config.tasks))
        examples = easy_task_examples(suite_config, seed, max(n_per_task, 3))
        docs += [tokenizer.encode_prompt(e.prompt) + tokenizer.encode_answer(e.answer)
                 for e in examples]
    order = np.random.default_rng(seed).permutation(len(docs))
    stream = np.concatenate([np.asarray(docs[i], np.int32) for i in order])
    n_rows = len(stream) // seq_len
    if n_rows < 1:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one row of {seq_len}")
    tokens = stream[: n_rows * seq_len].reshape(n_rows, seq_len)
    return {"tokens": tokens, "loss_mask": np.ones_like(tokens, bool)}
