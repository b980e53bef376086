"""Reductions over big host leaves as parallel row blocks (the CPU backends' pass 1).

XLA:CPU runs one reduction on one thread. A leaf seen as a 2-D *row view* ``(rows, cols)`` is
cut into contiguous blocks of whole rows; each block's reduction is a compiled program that
slices its rows from a traced start (the slice fuses into the reduction: no copy), and the
blocks run at once on ``host.thread_pool()``. Per-row partial sums are short float32
accumulations, so summing the blocks' partial results changes only float32 rounding. Used by
the fusion kernel (``fusion_kernel``) and the eager SLERP (``merges.slerp``).

Row view of a leaf of ``shape`` (``parts``: devices the leaf is split over, 1 without a mesh):
- two or more axes: ``(prod(shape[:-1]), shape[-1])``;
- zero or one axis: ``(size / 1024, 1024)`` when that splits evenly over the parts, else
  ``(parts, size / parts)``.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np

from cpift_jax import host

__all__ = ["BLOCK_MIN_ENTRIES", "row_view", "split_rows", "submit_row_blocks"]

_ROW = 1024
# Leaves of at least this many entries reduce as parallel row blocks (1.6x on two cores).
BLOCK_MIN_ENTRIES = 1 << 20


def row_view(shape: tuple[int, ...], parts: int = 1) -> tuple[int, int]:
    """The ``(rows, cols)`` view of a leaf of ``shape`` (see the module docstring)."""
    size = math.prod(shape)
    if len(shape) >= 2:
        cols = shape[-1]
        return (size // cols if cols else math.prod(shape[:-1]), cols)
    if size % (parts * _ROW) == 0 and size > 0:
        return (size // _ROW, _ROW)
    if size % parts:
        raise ValueError(f"a leaf of {size} entries does not split into {parts} equal parts")
    return (parts, size // parts)


def split_rows(rows: int, blocks: int) -> list[tuple[int, int]]:
    """``(start, count)`` of ``blocks`` contiguous row blocks of near-equal size (fewer when
    there are fewer rows), in row order."""
    size = -(-rows // max(1, blocks))
    return [(start, min(size, rows - start)) for start in range(0, rows, max(1, size))]


def submit_row_blocks(
    program_for: Callable[[int], Callable], args: Sequence, rows: int, blocks: int
) -> list[concurrent.futures.Future]:
    """Futures of ``program_for(count)(np.int32(start), *args)``, one per row block of
    ``split_rows(rows, blocks)``, in row order, each run on ``host.thread_pool()``.

    ``program_for(count)`` is the compiled reduction over ``count`` rows from ``start``
    (callers cache one per count). Each thread waits for its block's result: XLA:CPU would
    otherwise queue the blocks on its own executor one after another."""
    pool = host.thread_pool()

    def run(start: int, count: int):
        return jax.block_until_ready(program_for(count)(np.int32(start), *args))

    return [pool.submit(run, start, count) for start, count in split_rows(rows, blocks)]
