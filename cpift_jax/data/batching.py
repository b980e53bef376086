"""Token arrays for SFT and evaluation: packing with an answer-only loss mask, and batch streams.

A training row is ``encode_prompt(prompt) + encode_answer(answer)`` (for ``CharTokenizer``:
``BOS prompt SEP answer EOS``), right-padded with PAD to ``seq_len``. ``loss_mask[i]`` is 1 iff
token ``i`` is an answer token or the final EOS: the train step predicts token ``i`` from the
tokens before it and averages the loss over the positions where ``loss_mask`` is 1, so the
prompt and the padding never contribute.

Batch streams are infinite and deterministic per seed: epoch ``e`` visits the rows in the order
``np.random.default_rng([seed, e]).permutation``; batches run across epoch boundaries.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from cpift_jax.data.tokenizer import Tokenizer

__all__ = ["encode_examples", "encode_prompts", "batches", "mixture_batches", "IndexStream"]

Arrays = dict[str, np.ndarray]


def encode_examples(tokenizer: Tokenizer, examples: Sequence, seq_len: int) -> Arrays:
    """``{"tokens": int32 [N, seq_len], "loss_mask": bool [N, seq_len]}`` for (prompt, answer)
    pairs (``Example`` or any object with ``.prompt`` / ``.answer``; plain tuples also work).

    A row longer than ``seq_len`` raises ValueError naming the example; nothing is truncated.
    """
    if not examples:
        raise ValueError("encode_examples needs at least one example")
    tokens = np.full((len(examples), seq_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(examples), seq_len), bool)
    for i, ex in enumerate(examples):
        prompt, answer = (ex.prompt, ex.answer) if hasattr(ex, "prompt") else ex[:2]
        p, a = tokenizer.encode_prompt(prompt), tokenizer.encode_answer(answer)
        if len(p) + len(a) > seq_len:
            task = getattr(ex, "task", "?")
            raise ValueError(
                f"example {i} (task {task!r}) needs {len(p) + len(a)} tokens but seq_len is "
                f"{seq_len}; prompt starts {prompt[:40]!r}"
            )
        tokens[i, : len(p) + len(a)] = p + a
        mask[i, len(p) : len(p) + len(a)] = True
    return {"tokens": tokens, "loss_mask": mask}


def encode_prompts(
    tokenizer: Tokenizer, prompts: Sequence[str], *, multiple: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded prompt ids ``int32 [N, L]`` and their lengths ``int32 [N]`` for generation.

    ``L`` is the longest prompt rounded up to ``multiple`` so that nearby lengths share one
    compiled program.
    """
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    ids = [tokenizer.encode_prompt(p) for p in prompts]
    lengths = np.array([len(x) for x in ids], np.int32)
    width = -(-int(lengths.max()) // multiple) * multiple
    tokens = np.full((len(ids), width), tokenizer.pad_id, np.int32)
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = x
    return tokens, lengths


class IndexStream:
    """Row indices ``0..num_rows-1``, one fresh permutation per epoch, as an endless stream."""

    def __init__(self, num_rows: int, seed: int):
        if num_rows < 1:
            raise ValueError(f"cannot stream rows of an empty array (num_rows={num_rows})")
        self.num_rows, self.seed = num_rows, seed
        self.epoch, self._order, self._pos = -1, np.zeros(0, np.int64), 0

    def take(self, k: int) -> np.ndarray:
        out = []
        while k > 0:
            if self._pos == len(self._order):
                self.epoch += 1
                rng = np.random.default_rng([self.seed, self.epoch])
                self._order, self._pos = rng.permutation(self.num_rows), 0
            n = min(k, len(self._order) - self._pos)
            out.append(self._order[self._pos : self._pos + n])
            self._pos, k = self._pos + n, k - n
        return np.concatenate(out) if out else np.zeros(0, np.int64)


def _check_arrays(arrays: Arrays, what: str) -> int:
    if set(arrays) != {"tokens", "loss_mask"}:
        raise ValueError(f"{what}: expected keys tokens and loss_mask, got {sorted(arrays)}")
    if arrays["tokens"].shape != arrays["loss_mask"].shape or arrays["tokens"].ndim != 2:
        raise ValueError(
            f"{what}: tokens {arrays['tokens'].shape} and loss_mask {arrays['loss_mask'].shape} "
            "must be equal [rows, seq_len] shapes"
        )
    return arrays["tokens"].shape[0]


def batches(arrays: Arrays, batch_size: int, seed: int) -> Iterator[Arrays]:
    """Endless stream of ``batch_size``-row batches of ``arrays`` (module docstring)."""
    stream = IndexStream(_check_arrays(arrays, "batches"), seed)
    while True:
        idx = stream.take(batch_size)
        yield {k: v[idx] for k, v in arrays.items()}


def mixture_batches(
    arrays_by_task: Mapping[str, Arrays],
    weights: Mapping[str, float],
    batch_size: int,
    seed: int,
) -> Iterator[Arrays]:
    """Endless multi-task stream: task ``t`` fills a share ``weights[t]`` of every batch.

    Rows are allocated deterministically by smooth weighted round robin: every row slot adds
    ``w_t`` to each task's credit and goes to the task with the most credit (first on ties),
    which then pays 1. Every prefix of the stream is within a row or two per task of the exact
    proportions; uniform weights and a ``batch_size`` that is a multiple of the task count give
    equal rows in every batch. Each task's rows come from its own ``IndexStream``, so a small
    task is repeated more often rather than dropped.
    """
    names = list(arrays_by_task)
    if set(weights) != set(names):
        raise ValueError(f"weights are for tasks {sorted(weights)} but arrays for {sorted(names)}")
    w = np.array([float(weights[n]) for n in names])
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"task weights must be non-negative with a positive sum, got {weights}")
    w = w / w.sum()
    widths = {a["tokens"].shape[1] for a in arrays_by_task.values()}
    if len(widths) != 1:
        raise ValueError(f"all tasks must share one seq_len, got {sorted(widths)}")
    streams = [
        IndexStream(_check_arrays(arrays_by_task[n], f"task {n!r}"), seed * 1009 + i)
        for i, n in enumerate(names)
    ]
    # Integer credits keep ties exact (float credits drift apart in the last bit).
    units = np.round(w * 2**30).astype(np.int64)
    credit = np.zeros(len(names), np.int64)
    while True:
        counts = np.zeros(len(names), np.int64)
        for _ in range(batch_size):
            credit += units
            i = int(np.argmax(credit))
            credit[i] -= units.sum()
            counts[i] += 1
        parts = [
            {k: v[streams[i].take(int(c))] for k, v in arrays_by_task[n].items()}
            for i, (n, c) in enumerate(zip(names, counts))
            if c > 0
        ]
        yield {k: np.concatenate([p[k] for p in parts]) for k in ("tokens", "loss_mask")}
