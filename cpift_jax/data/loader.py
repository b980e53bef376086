"""A checkpointable per-process loader of global batches (Grain), for one device or many hosts.

Element ``i`` of the Grain ``MapDataset`` is global batch ``i`` of a random-access batch source
(``batching.UniformBatches`` / ``MixtureBatches``), so the stream is deterministic and
position ``i`` is reached without generating batches ``0..i-1``. Each process materialises only
the rows of global batch ``i`` that its devices hold under ``batch_sharding`` (rows
``lo:hi``, from the sharding's addressable indices) and the loader returns global
``jax.Array``s built with ``jax.make_array_from_process_local_data``. The iterator's position
(``get_state()``, Grain's ``{"next_index": k}``) is saved with a train-state checkpoint;
``set_state`` on a fresh loader resumes the stream at exactly that batch.
"""

from __future__ import annotations

from typing import Any, Protocol

import grain
import jax
import numpy as np

__all__ = ["BatchSource", "local_rows", "GlobalBatchLoader"]

Arrays = dict[str, np.ndarray]

# Batches are produced one or two ahead on a background thread; a deep prefetch queue would
# only hold memory (Grain's default is 500 elements).
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
_NUM_BATCHES = 2**62  # the streams are endless; Grain needs a length


class BatchSource(Protocol):
    batch_size: int

    def rows(self, i: int, lo: int, hi: int) -> Arrays: ...


def local_rows(batch_sharding: jax.sharding.Sharding, batch_shape: tuple[int, ...]) -> tuple[int, int]:
    """The rows ``lo:hi`` of a global batch of ``batch_shape`` that this process's devices hold
    under ``batch_sharding``. Raises ``ValueError`` if they are not one contiguous range (a
    mesh whose data axis interleaves processes)."""
    rows = set()
    for index in batch_sharding.addressable_devices_indices_map(batch_shape).values():
        first = index[0] if index else slice(None)
        rows.add((first.start or 0, batch_shape[0] if first.stop is None else first.stop))
    ranges = sorted(rows)
    lo, hi = ranges[0][0], ranges[0][1]
    for a, b in ranges[1:]:
        if a > hi:
            raise ValueError(
                f"process {jax.process_index()} holds batch rows {ranges} under {batch_sharding}, "
                "not one contiguous range; order the mesh devices so that each process's "
                "devices are adjacent along the batch axes"
            )
        hi = max(hi, b)
    return lo, hi


class _ProcessRows:
    """Grain random-access source: element ``i`` = this process's rows of global batch ``i``."""

    def __init__(self, source: BatchSource, lo: int, hi: int):
        self.source, self.lo, self.hi = source, lo, hi

    def __len__(self) -> int:
        return _NUM_BATCHES

    def __getitem__(self, i: int) -> Arrays:
        return self.source.rows(int(i), self.lo, self.hi)


class GlobalBatchLoader:
    """Iterator of global batches ``{"tokens", "loss_mask"}`` (packed sources: also
    ``"segment_ids"``, ``"positions"``; every key the source's rows have) as ``jax.Array``s
    sharded by ``batch_sharding`` (rows along its first dimension); ``get_state``/``set_state``
    give and take the position for checkpoints."""

    def __init__(self, source: BatchSource, batch_sharding: jax.sharding.Sharding,
                 seq_len: int, *, start: int = 0):
        self.batch_sharding = batch_sharding
        self.global_shape = (source.batch_size, seq_len)
        self.lo, self.hi = local_rows(batch_sharding, self.global_shape)
        dataset = grain.MapDataset.source(_ProcessRows(source, self.lo, self.hi))
        self._iter = iter(dataset.to_iter_dataset(_READ_OPTIONS))
        if start:
            self.set_state({"next_index": int(start)})

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        local = next(self._iter)
        return {
            key: jax.make_array_from_process_local_data(self.batch_sharding, value,
                                                        self.global_shape)
            for key, value in local.items()
        }

    def get_state(self) -> dict[str, Any]:
        """``{"next_index": k}``: the next batch this iterator returns is global batch ``k``."""
        return self._iter.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._iter.set_state(state)
