"""Chat messages -> token rows with the tokenizer's own chat template and an assistant-only loss.

``encode_chat(tokenizer, messages, seq_len)`` renders the conversation with
``apply_chat_template`` and marks as supervised exactly the tokens the model must produce: the
content of every assistant turn and the template's end-of-turn token after it (so the model
learns to stop), but not the role headers, the user turns, the system prompt or the padding.

How the assistant spans are found, for any template: for assistant turn ``i`` the template
renders ``messages[:i]`` with the generation prompt (everything the model is shown before it
speaks) and ``messages[:i+1]`` (the conversation through its reply). When the texts are prefixes
of one another, as every append-only chat template makes them, the reply is the character span
between the two lengths, minus trailing whitespace the template puts after its end-of-turn
token. The full text is tokenized once, and a token is supervised iff it starts inside a span
(character offsets of a fast tokenizer), so a token merging across a boundary is counted once.

Rows are ``int32`` tokens right-padded with the pad token (EOS when there is none) and a
``bool`` loss mask, the ``{"tokens", "loss_mask"}`` arrays of ``cpift_jax.data.batching``.
``token_ids`` gives one conversation's tokens and mask unpadded, the documents that
``cpift_jax.data.packing.pack`` packs several to a row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["assistant_spans", "token_ids", "encode_chat", "encode_chats"]


def _hf(tokenizer):
    """The ``transformers`` tokenizer (``HFTokenizer`` adapters are unwrapped)."""
    return getattr(tokenizer, "hf", tokenizer)


def _check_messages(messages: Sequence[dict], name: str) -> None:
    if not messages:
        raise ValueError(f"{name}: a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str)):
            raise ValueError(f"{name}: message {i} must be {{'role': system|user|assistant, "
                             f"'content': str}}, got {m!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{name}: no assistant turn, so nothing would be supervised")


def _render(tok, messages, generation_prompt: bool) -> str:
    return tok.apply_chat_template(list(messages), tokenize=False,
                                   add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: Sequence[dict], *, name: str = "conversation"
                    ) -> tuple[str, list[tuple[int, int]]]:
    """``(text, [(start, end), ...])``: the rendered conversation and the character span of each
    assistant turn (its content and end-of-turn marker), per the module docstring."""
    tok = _hf(tokenizer)
    _check_messages(messages, name)
    text = _render(tok, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], True) if i else ""
        through = _render(tok, messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                f"{name}: the chat template does not render turn {i} as an extension of the "
                "turns before it, so the assistant tokens cannot be located; use an append-only "
                "chat template")
        end = len(through.rstrip())
        if end <= len(before) or m["content"].strip() not in through[len(before):end]:
            raise ValueError(f"{name}: the chat template drops the content of assistant turn "
                             f"{i}; it cannot be supervised")
        spans.append((len(before), end))
    return text, spans


def token_ids(tokenizer, messages: Sequence[dict], *, name: str = "conversation"
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens int32 [n], loss_mask bool [n])`` of one conversation, unpadded (``n`` its
    token count); the mask is ``encode_chat``'s."""
    ids, mask = _ids_and_mask(_hf(tokenizer), messages, name)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def _ids_and_mask(tok, messages, name) -> tuple[list[int], list[bool]]:
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{name}: encode_chat needs a fast tokenizer (character offsets); got "
                         f"{type(tok).__name__}")
    text, spans = assistant_spans(tok, messages, name=name)
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    return ids, [any(a <= s < b for a, b in spans) for s, _ in offsets]


def encode_chat(tokenizer, messages: Sequence[dict], seq_len: int, *, truncate: bool = False,
                name: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
    """``(tokens int32 [seq_len], loss_mask bool [seq_len])`` for one conversation.

    A conversation longer than ``seq_len`` tokens raises ValueError naming it, unless
    ``truncate`` (then its first ``seq_len`` tokens are kept; a row left with no supervised
    token still raises).
    """
    tok = _hf(tokenizer)
    ids, mask = _ids_and_mask(tok, messages, name)
    if len(ids) > seq_len:
        if not truncate:
            raise ValueError(f"{name} needs {len(ids)} tokens but seq_len is {seq_len}; raise "
                             "seq_len, drop the example or pass truncate=True")
        ids, mask = ids[:seq_len], mask[:seq_len]
    if not any(mask):
        raise ValueError(f"{name}: no assistant token within the first {seq_len} tokens")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad rows with")
    tokens = np.full(seq_len, pad, np.int32)
    loss_mask = np.zeros(seq_len, bool)
    tokens[: len(ids)] = ids
    loss_mask[: len(mask)] = mask
    return tokens, loss_mask


def encode_chats(tokenizer, conversations: Sequence[Sequence[dict]], seq_len: int, *,
                 truncate: bool = False, names: Sequence[str] | None = None
                 ) -> dict[str, np.ndarray]:
    """``{"tokens": int32 [N, seq_len], "loss_mask": bool [N, seq_len]}`` (``batching``'s
    arrays); ``names`` label the conversations in errors (default ``conversation <i>``)."""
    if not conversations:
        raise ValueError("encode_chats needs at least one conversation")
    if names is not None and len(names) != len(conversations):
        raise ValueError(f"{len(names)} names for {len(conversations)} conversations")
    rows = [encode_chat(tokenizer, c, seq_len, truncate=truncate,
                        name=names[i] if names is not None else f"conversation {i}")
            for i, c in enumerate(conversations)]
    return {"tokens": np.stack([r[0] for r in rows]), "loss_mask": np.stack([r[1] for r in rows])}
