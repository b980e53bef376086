"""Sequence packing: several documents per ``seq_len`` row, with their boundaries kept in
attention and in the loss.

A *document* is one example's ``(tokens int [n], loss_mask bool [n])``, unpadded:
``chat.token_ids`` gives one per conversation, ``documents_from_rows`` cuts them out of
padded ``{"tokens", "loss_mask"}`` arrays (``batching.encode_examples``, ``chat.encode_chats``).
``pack(documents, seq_len)`` returns ``batching``'s arrays with two more, all ``[rows, seq_len]``:

- ``tokens`` int32: a row's documents back to back, then ``pad_id``;
- ``segment_ids`` int32: ``1..k`` for the row's ``k`` documents in order, 0 on padding;
- ``positions`` int32: ``0..n-1`` within each document (the rotary positions it has alone),
  0 on padding;
- ``loss_mask`` bool: each document's own mask, except that its first token is False (the
  train step would predict it from the previous document's last token; an unpacked row never
  counts its token 0 either), and False on padding.

With ``segment_ids`` and ``positions`` in the batch the train step attends only within a document
(``models.scan.hidden_states``), so a packed row's logits, summed loss and gradient are those of
its documents run one by one; padding attends only to padding and is never counted.

Placement is best-fit decreasing: documents sorted by length, longest first (ties in input
order), each into the row with the least room that still holds it (the lowest row on ties), a
new row when none does. It is deterministic, runs in ``O(N log N)``, and needs asymptotically at
most 11/9 of the fewest rows possible (Johnson 1973, for first- and best-fit decreasing alike).
Input order is not kept: rows mix documents of different lengths and
sources in the order above, and ``batching``'s streams shuffle the rows every epoch, so packing
needs no seed. ``efficiency(arrays)`` is the share of non-padding tokens, to log.

A document longer than ``seq_len`` raises ValueError naming it (``names[i]``, else its index),
unless ``truncate=True`` keeps its first ``seq_len`` tokens. An empty document raises.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["pack", "documents_from_rows", "efficiency", "Document"]

Document = tuple[np.ndarray, np.ndarray]  # (tokens int [n], loss_mask bool [n])


def documents_from_rows(arrays: Mapping[str, np.ndarray],
                        lengths: Sequence[int] | None = None) -> list[Document]:
    """Unpadded documents from right-padded ``{"tokens", "loss_mask"}`` rows.

    ``lengths[i]`` is row ``i``'s token count; by default each row runs through its last
    supervised token. Cutting the unsupervised tail changes no loss or gradient (a causal model
    never looks ahead), and the pad id may equal a real token (EOS), so it cannot mark the end.
    """
    tokens, mask = np.asarray(arrays["tokens"]), np.asarray(arrays["loss_mask"], bool)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"tokens {tokens.shape} and loss_mask {mask.shape} must be equal "
                         "[rows, seq_len] shapes")
    if lengths is None:
        supervised = mask.any(axis=1)
        if not supervised.all():
            raise ValueError(f"row {int(np.argmin(supervised))} has no supervised token, so its "
                             "length is unknown; pass lengths")
        lengths = tokens.shape[1] - np.argmax(mask[:, ::-1], axis=1)
    if len(lengths) != len(tokens):
        raise ValueError(f"{len(lengths)} lengths for {len(tokens)} rows")
    return [(tokens[i, :n], mask[i, :n]) for i, n in enumerate(int(n) for n in lengths)]


def _placement(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: the documents of each row (module docstring)."""
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # free tokens -> heap of the rows with that much room
    rooms: list[int] = []  # the keys of by_room, sorted
    for doc in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[doc]
        j = bisect.bisect_left(rooms, n)
        if j == len(rooms):
            row, room = len(rows), seq_len
            rows.append([])
        else:
            room = rooms[j]
            row = heapq.heappop(by_room[room])
            if not by_room[room]:
                del by_room[room]
                rooms.pop(j)
        rows[row].append(doc)
        left = room - n
        if left:  # a full row takes nothing more (documents have at least one token)
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            heapq.heappush(by_room[left], row)
    return rows


def pack(documents: Sequence[Document], seq_len: int, *, pad_id: int = 0,
         truncate: bool = False, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """``{"tokens", "loss_mask", "segment_ids", "positions"}`` ``[rows, seq_len]`` arrays of the
    packed ``documents`` (module docstring for the layout and the placement)."""
    if not documents:
        raise ValueError("pack needs at least one document")
    if names is not None and len(names) != len(documents):
        raise ValueError(f"{len(names)} names for {len(documents)} documents")
    docs = []
    for i, doc in enumerate(documents):
        name = names[i] if names is not None else f"document {i}"
        tokens, mask = (np.asarray(x) for x in doc)
        if tokens.ndim != 1 or tokens.shape != mask.shape:
            raise ValueError(f"{name}: tokens {tokens.shape} and loss_mask {mask.shape} must be "
                             "equal 1-D shapes")
        if len(tokens) == 0:
            raise ValueError(f"{name} is empty")
        if len(tokens) > seq_len:
            if not truncate:
                raise ValueError(f"{name} has {len(tokens)} tokens but seq_len is {seq_len}; "
                                 "raise seq_len, drop it or pass truncate=True")
            tokens, mask = tokens[:seq_len], mask[:seq_len]
        docs.append((tokens, mask.astype(bool)))
    rows = _placement([len(t) for t, _ in docs], seq_len)
    out = {"tokens": np.full((len(rows), seq_len), pad_id, np.int32),
           "loss_mask": np.zeros((len(rows), seq_len), bool),
           "segment_ids": np.zeros((len(rows), seq_len), np.int32),
           "positions": np.zeros((len(rows), seq_len), np.int32)}
    for r, row in enumerate(rows):
        start = 0
        for segment, doc in enumerate(row, start=1):
            tokens, mask = docs[doc]
            end = start + len(tokens)
            out["tokens"][r, start:end] = tokens
            out["loss_mask"][r, start + 1:end] = mask[1:]
            out["segment_ids"][r, start:end] = segment
            out["positions"][r, start:end] = np.arange(len(tokens))
            start = end
    return out


def efficiency(arrays: Mapping[str, np.ndarray]) -> float:
    """Share of the packed rows' tokens that belong to a document (not padding), in [0, 1]."""
    segments = np.asarray(arrays["segment_ids"])
    return float((segments > 0).mean()) if segments.size else 0.0
