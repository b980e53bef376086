"""Reused host buffers for streaming tensors into XLA without copies or page faults.

Why: a streaming merge moves every byte of every input model through host memory once. With a
fresh ``np.empty`` per tensor (and a fresh XLA buffer for ``device_put`` and for each result),
every 4 KiB page of every tensor is first faulted in and zeroed by the kernel: on a 3 x 1B
float32 merge that was ~2/3 of the wall time, spent as system time. Here

- ``Staging`` keeps, per prefetch slot and per input, one 64-byte aligned buffer sized for that
  input's largest tensor; tensors are ``pread`` into it (pages touched once per run);
- ``to_jax`` hands such a view to XLA zero-copy through DLPack (XLA:CPU needs 64-byte
  alignment). Types DLPack cannot carry (bfloat16, float8) go as same-width unsigned integers
  and are bit-cast back inside the jitted program (``from_storage``), which costs nothing;
- ``SparePool`` keeps finished output arrays, once written, so the next output of the same
  shape can be computed into one by donation instead of into freshly faulted memory.

Lifetime rule: an array from ``to_jax`` aliases its staging buffer; it must be dropped before
that slot is refilled (two slots: the tensor being merged and the one being prefetched).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ALIGNMENT", "aligned_empty", "Staging", "to_jax", "from_storage", "host_device",
           "SparePool", "storage_dtype"]

ALIGNMENT = 64  # XLA:CPU refuses to alias host memory aligned to less
_DLPACK_KINDS = "iufc"  # numpy kinds that DLPack carries; ml_dtypes' floats report kind "V"


def aligned_empty(nbytes: int, alignment: int = ALIGNMENT) -> np.ndarray:
    """Uninitialised uint8 array of ``nbytes`` whose data starts on an ``alignment`` boundary."""
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes]


class Staging:
    """``slots`` x ``len(sizes)`` reusable byte buffers; ``buffer(slot, i)`` is input i's buffer
    in that slot, allocated on first use with ``sizes[i]`` bytes."""

    def __init__(self, sizes: Sequence[int], slots: int = 2):
        self._sizes = list(sizes)
        self._buffers: list[list[np.ndarray | None]] = [[None] * len(sizes) for _ in range(slots)]

    def buffer(self, slot: int, index: int) -> np.ndarray:
        buf = self._buffers[slot][index]
        if buf is None:
            buf = self._buffers[slot][index] = aligned_empty(max(1, self._sizes[index]))
        return buf

    def holds(self, array: np.ndarray) -> bool:
        """Whether ``array``'s memory lies inside one of the staging buffers."""
        return any(b is not None and np.shares_memory(array, b)
                   for slot in self._buffers for b in slot)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for slot in self._buffers for b in slot if b is not None)


def storage_dtype(dtype: np.dtype) -> np.dtype | None:
    """Unsigned integer dtype of the same width for dtypes DLPack cannot carry, else None."""
    return None if dtype.kind in _DLPACK_KINDS or dtype == np.bool_ else np.dtype(f"u{dtype.itemsize}")


def to_jax(array: np.ndarray) -> tuple[jax.Array, np.dtype | None]:
    """``(jax array, true dtype or None)``: zero-copy when ``array`` is C-contiguous and
    aligned, a copy otherwise. For dtypes DLPack cannot carry the true dtype is returned and the
    jax array holds the raw bits as unsigned integers, copied or not (so a jitted consumer sees
    one signature whatever the alignment); ``from_storage`` restores it (inside jit: a free
    bitcast)."""
    array = np.asarray(array)
    storage = storage_dtype(array.dtype)
    view = array if storage is None else array.view(storage)
    true_dtype = None if storage is None else array.dtype
    if view.flags.c_contiguous and view.ctypes.data % ALIGNMENT == 0 and view.size:
        try:
            return jnp.from_dlpack(view, copy=False), true_dtype
        except (BufferError, ValueError, TypeError):
            pass  # an exotic layout or dtype: fall through to a copy
    return jax.device_put(view, host_device()), true_dtype


def host_device() -> jax.Device:
    """The CPU device that DLPack imports of host memory land on (copies go there too, so a
    merge's inputs never straddle devices)."""
    return jax.devices("cpu")[0]


def from_storage(x: jax.Array, true_dtype) -> jax.Array:
    """Undoes ``to_jax``'s integer view (no-op when ``true_dtype`` is None)."""
    return x if true_dtype is None else jax.lax.bitcast_convert_type(x, jnp.dtype(true_dtype))


class SparePool:
    """Written output arrays waiting to be reused, at most ``per_shape`` per (shape, dtype).

    Thread-safe: outputs come back from the writer thread. A returned array must have no live
    NumPy view (XLA will not donate a buffer that is still exported).
    """

    def __init__(self, per_shape: int = 2):
        self._per_shape = per_shape
        self._free: dict[tuple, list[jax.Array]] = {}
        self._lock = threading.Lock()

    def put(self, array: jax.Array) -> None:
        key = (tuple(array.shape), np.dtype(array.dtype))
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < self._per_shape and not array.is_deleted():
                free.append(array)

    def take(self, shape, dtype) -> jax.Array | None:
        with self._lock:
            free = self._free.get((tuple(shape), np.dtype(dtype)))
            return free.pop() if free else None
