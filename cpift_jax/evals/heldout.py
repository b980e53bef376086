"""Held-out loss and bits per byte on reference answers: the metric for open-ended tasks, and for
code when code execution is not opted in.

For records (``cpift_jax.data.readers.Record``) whose assistant turns are the reference answers,
each conversation is tokenized as for training (``cpift_jax.data.chat.encode_chat``: the
tokenizer's chat template, the loss on every assistant turn's content and its end-of-turn token;
a tokenizer without a chat template takes a single ``user`` / ``assistant`` pair through
``encode_prompt`` / ``encode_answer``, as ``cpift_jax.data.batching`` does). Then, with
``NLL_i = -log p(token_i | tokens before it)`` summed over the supervised tokens ``S``:

    loss          = sum_{i in S} NLL_i / |S|                     (nats per supervised token)
    bits_per_byte = sum_{i in S} NLL_i / ln 2 / B

where ``B`` is the number of UTF-8 bytes of the reference text (the assistant contents). Bits per
byte does not depend on the tokenizer's granularity, so models with different vocabularies
compare (Gao et al. 2020, "The Pile", section 4). The supervised tokens include the end-of-turn
marker, whose bytes are not in ``B``: its NLL is part of the reply's cost.

``sequence_nll`` is the shared primitive (also behind ``multiple_choice``): per-row sums of the
masked next-token NLL, computed by the train step's own loss (``training.loss.chunked_nll`` over
``models.scan.hidden_states``), one compiled program per (batch, width), on whatever sharding the
parameters carry.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from cpift_jax.data import batching, chat
from cpift_jax.evals.math import chat_tokenizer
from cpift_jax.models import scan as scan_lib
from cpift_jax.models.config import ModelConfig
from cpift_jax.training import loss as loss_lib

__all__ = ["HeldoutResult", "sequence_nll", "encode_references", "reference_bytes", "evaluate"]

Pytree = Any


@functools.partial(jax.jit, static_argnames=("config", "vocab_chunk"))
def _row_nll(config: ModelConfig, params: Pytree, tokens: jax.Array, mask: jax.Array,
             vocab_chunk: int) -> jax.Array:
    hidden = scan_lib.hidden_states(config, params, tokens[:, :-1])
    kernel = scan_lib.head_kernel(config, params)

    def one_row(h, targets, m):
        return loss_lib.chunked_nll(h, kernel, targets, m, vocab_chunk,
                                    softcap_at=config.final_logit_softcapping)[0]

    return jax.vmap(one_row)(hidden, tokens[:, 1:], mask[:, 1:])


def sequence_nll(model_config: ModelConfig, params: Pytree, tokens: np.ndarray,
                 loss_mask: np.ndarray, *, batch_size: int = 16, vocab_chunk: int = 0
                 ) -> np.ndarray:
    """float64 ``[N]``: ``sum_i loss_mask[n, i] * -log p(tokens[n, i] | tokens[n, :i])``.

    ``tokens`` int ``[N, width]`` (right-padded), ``loss_mask`` bool ``[N, width]``; position 0
    cannot be predicted and must not be marked. Rows run in batches of ``batch_size`` (the last
    one filled with copies of a row, dropped again), so every batch has one shape.
    """
    tokens = np.asarray(tokens, np.int32)
    loss_mask = np.asarray(loss_mask, bool)
    if tokens.ndim != 2 or tokens.shape != loss_mask.shape:
        raise ValueError(f"tokens {tokens.shape} and loss_mask {loss_mask.shape} must be equal "
                         "[rows, width] shapes")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if loss_mask[:, 0].any():
        raise ValueError("loss_mask marks position 0, which has no preceding token to predict it")
    if tokens.min(initial=0) < 0 or tokens.max(initial=0) >= model_config.vocab_size:
        raise ValueError(f"token ids must lie in [0, {model_config.vocab_size})")
    n = tokens.shape[0]
    padded = -(-n // batch_size) * batch_size
    if padded > n:
        tokens = np.concatenate([tokens, np.repeat(tokens[-1:], padded - n, axis=0)])
        loss_mask = np.concatenate([loss_mask, np.repeat(loss_mask[-1:], padded - n, axis=0)])
    sums = []
    for start in range(0, padded, batch_size):
        stop = start + batch_size
        out = _row_nll(model_config, params, tokens[start:stop], loss_mask[start:stop],
                       vocab_chunk)
        sums.append(np.asarray(jax.device_get(out), np.float64))
    return np.concatenate(sums)[:n]


def _width(rows: int, multiple: int = 16) -> int:
    return -(-rows // multiple) * multiple


def encode_references(tokenizer, records: Sequence, seq_len: int) -> dict[str, np.ndarray]:
    """``{"tokens", "loss_mask"}`` ``[N, seq_len]`` for the records' conversations (module doc);
    a conversation longer than ``seq_len`` raises ValueError naming its record id (nothing is
    truncated: the bytes would no longer match the tokens)."""
    if not records:
        raise ValueError("encode_references needs at least one record")
    if chat_tokenizer(tokenizer) is not None:
        return chat.encode_chats(tokenizer, [r.messages for r in records], seq_len,
                                 names=[f"record {r.id!r}" for r in records])
    rows = []
    for r in records:
        roles = [m["role"] for m in r.messages]
        if roles != ["user", "assistant"]:
            raise ValueError(
                f"record {r.id!r}: a tokenizer without a chat template can only encode one "
                f"user turn followed by one assistant turn, got roles {roles}")
        pair = (r.messages[0]["content"], r.messages[1]["content"])
        try:
            rows.append(batching.encode_examples(tokenizer, [pair], seq_len))
        except ValueError as err:
            raise ValueError(f"record {r.id!r}: {err}") from err
    return {key: np.concatenate([row[key] for row in rows]) for key in ("tokens", "loss_mask")}


def reference_bytes(record) -> int:
    """UTF-8 bytes of the record's reference text: the content of every assistant turn."""
    return sum(len(m["content"].encode("utf-8")) for m in record.messages
               if m["role"] == "assistant")


@dataclasses.dataclass(frozen=True)
class HeldoutResult:
    """``loss``: mean NLL per supervised token (nats); ``bits_per_byte``: total NLL / ln 2 /
    reference bytes; per record (in input order): ``nll`` (summed nats), ``tokens``, ``bytes``."""

    loss: float
    bits_per_byte: float
    total_nll: float
    total_tokens: int
    total_bytes: int
    ids: list[str]
    nll: list[float]
    tokens: list[int]
    bytes: list[int]

    def summary(self) -> dict[str, float]:
        return {"loss": self.loss, "bits_per_byte": self.bits_per_byte}


def evaluate(model_config: ModelConfig, params: Pytree, tokenizer, records: Sequence, *,
             seq_len: int, batch_size: int = 16, vocab_chunk: int = 0) -> HeldoutResult:
    """Held-out loss and bits per byte of the records' reference answers (module doc)."""
    arrays = encode_references(tokenizer, records, seq_len)
    tokens, mask = arrays["tokens"], arrays["loss_mask"]
    # Trim the padding columns no row needs, to a multiple of 16 so nearby lengths share a program.
    used = int(np.flatnonzero(mask.any(axis=0)).max()) + 1
    width = min(seq_len, _width(used))
    tokens, mask = tokens[:, :width], mask[:, :width]
    nll = sequence_nll(model_config, params, tokens, mask, batch_size=batch_size,
                       vocab_chunk=vocab_chunk)
    counts = mask.sum(axis=1).astype(int)
    nbytes = [reference_bytes(r) for r in records]
    for r, b in zip(records, nbytes):
        if b == 0:
            raise ValueError(f"record {r.id!r}: the reference answer is empty (0 bytes)")
    total_nll, total_tokens, total_bytes = float(nll.sum()), int(counts.sum()), sum(nbytes)
    return HeldoutResult(
        loss=total_nll / total_tokens,
        bits_per_byte=total_nll / math.log(2) / total_bytes,
        total_nll=total_nll, total_tokens=total_tokens, total_bytes=total_bytes,
        ids=[r.id for r in records], nll=nll.tolist(), tokens=counts.tolist(), bytes=nbytes)
