"""Tokenizers for the synthetic suite: a fixed character vocabulary, and a Hugging Face adapter.

Batching and evaluation only use the ``Tokenizer`` protocol below, so the same code trains the
toy character-level models and, later, a model with SmolLM2's BPE tokenizer:

* ``encode(text)`` / ``decode(ids)``: plain text <-> ids, no special tokens added;
* ``encode_prompt(prompt)``: every id the model sees before the answer (BOS, the prompt, SEP);
* ``encode_answer(answer)``: the answer's ids followed by EOS (the supervised part of a row).

Task tags are written in text as ``<name>`` (``<arith>``); ``CharTokenizer`` maps each known
tag to one token, a BPE tokenizer simply spells it.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["Tokenizer", "CharTokenizer", "HFTokenizer", "SPECIAL_TOKENS", "CHARACTERS", "tag_text"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<sep>")
# Newline plus printable ASCII (space .. "~"): 96 characters. Tabs and other control characters
# are not in the vocabulary; text containing them is refused (see corpus.sanitize).
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))
assert set(CHARACTERS) <= set(string.printable)


def tag_text(task: str) -> str:
    """The text form of a task tag, e.g. ``<arith>``."""
    return f"<{task}>"


@runtime_checkable
class Tokenizer(Protocol):
    """What batching, evaluation and pretraining need from a tokenizer."""

    vocab_size: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_prompt(self, prompt: str) -> list[int]: ...

    def encode_answer(self, answer: str) -> list[int]: ...


class CharTokenizer:
    """One token per character over a fixed vocabulary.

    Ids: ``<pad>=0, <bos>=1, <eos>=2, <sep>=3``, then one id per task tag (in the order given),
    then the 96 characters of ``CHARACTERS``. The vocabulary depends only on ``tags``, so a model
    trained with one instance works with any other built from the same tags.
    """

    def __init__(self, tags: Sequence[str] = ()):
        tags = tuple(tags)
        if len(set(tags)) != len(tags):
            raise ValueError(f"duplicate task tags: {tags}")
        for tag in tags:
            if not tag or not all(ch.isalnum() or ch == "_" for ch in tag):
                raise ValueError(f"task tag {tag!r} must be a non-empty [A-Za-z0-9_] name")
        self.tags = tags
        self.tokens = SPECIAL_TOKENS + tuple(tag_text(t) for t in tags) + tuple(CHARACTERS)
        self.vocab_size = len(self.tokens)
        self.pad_id, self.bos_id, self.eos_id, self.sep_id = range(4)
        self._tag_ids = {tag_text(t): 4 + i for i, t in enumerate(tags)}
        self._char_ids = {ch: 4 + len(tags) + i for i, ch in enumerate(CHARACTERS)}

    def tag_id(self, task: str) -> int:
        if tag_text(task) not in self._tag_ids:
            raise ValueError(f"no tag token for task {task!r}; this tokenizer has tags {self.tags}")
        return self._tag_ids[tag_text(task)]

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; a known ``<tag>`` is one token. Unknown characters raise ValueError."""
        ids, i = [], 0
        while i < len(text):
            if text[i] == "<":
                end = text.find(">", i)
                tag_id = self._tag_ids.get(text[i:end + 1]) if end > 0 else None
                if tag_id is not None:
                    ids.append(tag_id)
                    i = end + 1
                    continue
            ch = text[i]
            if ch not in self._char_ids:
                raise ValueError(
                    f"character {ch!r} at position {i} is not in the character vocabulary "
                    f"(newline and printable ASCII); text starts {text[:40]!r}"
                )
            ids.append(self._char_ids[ch])
            i += 1
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens other than tags are dropped, tags are spelled."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            if i >= 4:
                out.append(self.tokens[i])
        return "".join(out)

    def encode_prompt(self, prompt: str) -> list[int]:
        return [self.bos_id] + self.encode(prompt) + [self.sep_id]

    def encode_answer(self, answer: str) -> list[int]:
        return self.encode(answer) + [self.eos_id]


class HFTokenizer:
    """Adapter from a ``transformers`` tokenizer to the ``Tokenizer`` protocol.

    ``prompt_prefix`` / ``prompt_suffix`` are text placed around the prompt (e.g. a chat
    template's user/assistant headers; the suffix plays SEP's role); BOS is prepended when the
    tokenizer has one. PAD falls back to EOS when the tokenizer defines no pad token.
    """

    def __init__(self, hf_tokenizer, *, prompt_prefix: str = "", prompt_suffix: str = "\n"):
        if hf_tokenizer.eos_token_id is None:
            raise ValueError("the Hugging Face tokenizer has no eos_token_id; set one first")
        self.hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        self.eos_id = int(hf_tokenizer.eos_token_id)
        pad = hf_tokenizer.pad_token_id
        self.pad_id = int(self.eos_id if pad is None else pad)
        bos = hf_tokenizer.bos_token_id
        self._bos = [] if bos is None else [int(bos)]
        self.prompt_prefix, self.prompt_suffix = prompt_prefix, prompt_suffix

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        return self._bos + self.encode(self.prompt_prefix + prompt + self.prompt_suffix)

    def encode_answer(self, answer: str) -> list[int]:
        return self.encode(answer) + [self.eos_id]
