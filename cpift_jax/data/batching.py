"""Token arrays for SFT and evaluation: packing with an answer-only loss mask, and batch streams.

A training row is ``encode_prompt(prompt) + encode_answer(answer)`` (for ``CharTokenizer``:
``BOS prompt SEP answer EOS``), right-padded with PAD to ``seq_len``. ``loss_mask[i]`` is 1 iff
token ``i`` is an answer token or the final EOS: the train step predicts token ``i`` from the
tokens before it and averages the loss over the positions where ``loss_mask`` is 1, so the
prompt and the padding never contribute.

Batch streams are infinite and deterministic per seed: epoch ``e`` visits the rows in the order
``np.random.default_rng([seed, e]).permutation``; batches run across epoch boundaries. ``UniformBatches``/``MixtureBatches`` give random access
to the same streams (global batch ``i`` without batches ``0..i-1``), for per-process loading.

Packed rows (``cpift_jax.data.packing.pack``) also carry int32 ``segment_ids`` and ``positions``
of the same ``[rows, seq_len]`` shape; the streams carry whatever key set their arrays have
(``KEYS`` or ``PACKED_KEYS``), and every task of a mixture must have the same one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from cpift_jax.data.tokenizer import Tokenizer

__all__ = ["encode_examples", "encode_prompts", "batches", "mixture_batches", "IndexStream",
           "UniformBatches", "MixtureBatches", "KEYS", "PACKED_KEYS"]

Arrays = dict[str, np.ndarray]

# The key sets a stream's arrays may have: plain rows, or packed rows (data.packing).
KEYS = ("tokens", "loss_mask")
PACKED_KEYS = KEYS + ("segment_ids", "positions")


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
    """Row indices ``0..num_rows-1``, one fresh permutation per epoch, as an endless stream.

    Position ``n`` of the stream is row ``permutation_e[n % num_rows]`` of epoch
    ``e = n // num_rows``, so any stretch can be read without the ones before it (``at``).
    """

    def __init__(self, num_rows: int, seed: int):
        if num_rows < 1:
            raise ValueError(f"cannot stream rows of an empty array (num_rows={num_rows})")
        self.num_rows, self.seed = num_rows, seed
        self._next = 0
        self._cached = (-1, np.zeros(0, np.int64))  # (epoch, its permutation)

    def _permutation(self, epoch: int) -> np.ndarray:
        # Streams are read forwards, so one cached epoch suffices. A loader's prefetch threads
        # read the same stream: the pair is replaced in one assignment and each call returns its
        # own local, so a thread never gets another epoch's order.
        cached_epoch, order = self._cached
        if cached_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._cached = (epoch, order)
        return order

    def at(self, start: int, k: int) -> np.ndarray:
        """Stream positions ``start .. start + k - 1``."""
        out = []
        while k > 0:
            epoch, offset = divmod(start, self.num_rows)
            n = min(k, self.num_rows - offset)
            out.append(self._permutation(epoch)[offset : offset + n])
            start, k = start + n, k - n
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def take(self, k: int) -> np.ndarray:
        """The next ``k`` positions."""
        out = self.at(self._next, k)
        self._next += k
        return out


def _check_arrays(arrays: Arrays, what: str) -> int:
    """The number of rows; ValueError unless the keys are ``KEYS`` or ``PACKED_KEYS`` and every
    array has the ``[rows, seq_len]`` shape of ``tokens``."""
    if set(arrays) not in (set(KEYS), set(PACKED_KEYS)):
        raise ValueError(f"{what}: expected keys tokens and loss_mask (packed rows: also "
                         f"segment_ids and positions), got {sorted(arrays)}")
    shape = np.shape(arrays["tokens"])
    for key, value in arrays.items():
        if np.shape(value) != shape or len(shape) != 2:
            raise ValueError(f"{what}: {key} has shape {np.shape(value)} but every array must "
                             f"have the [rows, seq_len] shape of tokens, {shape}")
    return shape[0]


class UniformBatches:
    """Random-access ``batches``: ``self[i]`` is global batch ``i`` of the endless stream,
    ``self.rows(i, lo, hi)`` only its rows ``lo:hi`` (one process's share)."""

    def __init__(self, arrays: Arrays, batch_size: int, seed: int):
        self.arrays, self.batch_size = arrays, batch_size
        self._stream = IndexStream(_check_arrays(arrays, "batches"), seed)

    def rows(self, i: int, lo: int, hi: int) -> Arrays:
        idx = self._stream.at(i * self.batch_size + lo, hi - lo)
        return {k: v[idx] for k, v in self.arrays.items()}

    def __getitem__(self, i: int) -> Arrays:
        return self.rows(i, 0, self.batch_size)


class MixtureBatches:
    """Random-access ``mixture_batches`` (same stream): ``self[i]`` is global batch ``i``,
    ``self.rows(i, lo, hi)`` only its rows ``lo:hi``.

    The round robin's state (credits, rows taken per task) after batch ``i`` depends on every
    earlier slot, so it is kept for every ``_EVERY``-th batch as it is first computed; reaching
    batch ``i`` replays at most ``_EVERY`` batches from the nearest kept state (a restored
    iterator rebuilds the table once, in time linear in ``i``).
    """

    _EVERY = 64

    def __init__(self, arrays_by_task: Mapping[str, Arrays], weights: Mapping[str, float],
                 batch_size: int, seed: int):
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
        self.names, self.arrays, self.batch_size = names, arrays_by_task, batch_size
        self._streams = [
            IndexStream(_check_arrays(arrays_by_task[n], f"task {n!r}"), seed * 1009 + i)
            for i, n in enumerate(names)
        ]
        packed = [n for n in names if len(arrays_by_task[n]) == len(PACKED_KEYS)]
        if packed and len(packed) != len(names):
            raise ValueError(f"all tasks must be packed or none (one key set per stream); "
                             f"packed: {packed}, not packed: "
                             f"{[n for n in names if n not in packed]}")
        # Integer credits keep ties exact (float credits drift apart in the last bit).
        self._units = [int(u) for u in np.round(w * 2**30).astype(np.int64)]
        zeros = [0] * len(names)
        self._kept = [(tuple(zeros), tuple(zeros))]  # (credit, rows taken) before batch 0, 64, ...

    def _allocate(self, credit: list[int]) -> list[int]:
        """Rows per task in one batch; advances ``credit`` in place."""
        units, total = self._units, sum(self._units)
        counts = [0] * len(units)
        for _ in range(self.batch_size):
            for t, u in enumerate(units):
                credit[t] += u
            best = max(range(len(units)), key=credit.__getitem__)  # first on ties
            credit[best] -= total
            counts[best] += 1
        return counts

    def plan(self, i: int) -> tuple[list[int], list[int]]:
        """(rows of each task taken before batch ``i``, rows of each task in batch ``i``)."""
        slot = min(i // self._EVERY, len(self._kept) - 1)
        credit, taken = map(list, self._kept[slot])
        for b in range(slot * self._EVERY, i + 1):
            counts = self._allocate(credit)
            if b == i:
                return taken, counts
            taken = [a + c for a, c in zip(taken, counts)]
            if (b + 1) % self._EVERY == 0 and (b + 1) // self._EVERY == len(self._kept):
                self._kept.append((tuple(credit), tuple(taken)))
        raise AssertionError("unreachable")

    def rows(self, i: int, lo: int, hi: int) -> Arrays:
        taken, counts = self.plan(i)
        # The batch is the tasks' parts in task order; rows lo:hi cut through some of them.
        parts, offset = [], 0
        for t, (start, count) in enumerate(zip(taken, counts)):
            a, b = max(lo, offset), min(hi, offset + count)
            if a < b:
                idx = self._streams[t].at(start + a - offset, b - a)
                parts.append({k: v[idx] for k, v in self.arrays[self.names[t]].items()})
            offset += count
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def __getitem__(self, i: int) -> Arrays:
        return self.rows(i, 0, self.batch_size)


def batches(arrays: Arrays, batch_size: int, seed: int) -> Iterator[Arrays]:
    """Endless stream of ``batch_size``-row batches of ``arrays`` (module docstring)."""
    source = UniformBatches(arrays, batch_size, seed)
    return (source[i] for i in itertools.count())


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
    task is repeated more often rather than dropped. ``MixtureBatches`` gives random access.
    """
    source = MixtureBatches(arrays_by_task, weights, batch_size, seed)
    return (source[i] for i in itertools.count())
