"""The safetensors format: files read one tensor at a time and written one shard at a time.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
N, N bytes of JSON ``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]},
"__metadata__": {str: str}}``, then the data buffer; offsets count from the buffer start and
every tensor is C-contiguous little-endian.

Why not ``safetensors.safe_open``: it memory-maps the file, and every page a read touches stays
in the process's resident set while the file is open (a streaming merge would end up "holding"
every input model), and its numpy back end has no bfloat16. Here a tensor is ``pread`` into a
fresh array, or into a caller's reused buffer (one copy, nothing stays mapped; bfloat16 and
float8 come from ``ml_dtypes``).
Writing: every tensor's shape and dtype is known before any is computed, so each shard's header
is written first and the tensors are appended as they arrive; no shard is ever held in memory.
Shards follow the Hugging Face convention: one shard is ``model.safetensors``; more are
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``. Both
``cpift_jax.models.hf.save`` and the streaming merge (``cpift_jax.streaming``, which passes
an ``O_DIRECT`` file writer) write through ``ShardedWriter``. Files written here are checked
against the reference reader in ``tests/test_streaming.py`` and ``tests/test_io_buffers.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

__all__ = [
    "TensorSpec",
    "TensorLocation",
    "dtype_from_code",
    "dtype_code",
    "read_header",
    "Reader",
    "parse_size",
    "plan_shards",
    "shard_file_name",
    "ShardedWriter",
    "INDEX_FILE",
    "SINGLE_FILE",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100 * 2**20  # the reference reader's limit too
_MAX_IO = 1 << 30  # bytes per pread call (Linux caps one call near 2 GiB)

_CODES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: code for code, dtype in _CODES.items()}


def dtype_from_code(code: str, *, where: str = "") -> np.dtype:
    """numpy dtype of a safetensors dtype code ("BF16" -> ml_dtypes.bfloat16)."""
    if code not in _CODES:
        raise ValueError(f"{where}unsupported safetensors dtype {code!r}; known: {sorted(_CODES)}")
    return _CODES[code]


def dtype_code(dtype) -> str:
    """safetensors dtype code of a numpy dtype."""
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
    return _NAMES[dtype]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What a tensor is, independent of where it is stored."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class TensorLocation:
    """A tensor inside a safetensors file: its spec, the file and its absolute byte offset."""

    spec: TensorSpec
    file: str
    offset: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorLocation], dict[str, str]]:
    """``({name: TensorLocation}, metadata)`` of one safetensors file, in storage order.

    Validates what a later read relies on: known dtypes, shapes matching the byte ranges, and
    ranges inside the file. Errors name the file and the tensor.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: header length {n} is invalid for a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: header is not valid JSON: {err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    tensors = []
    for name, entry in header.items():
        where = f"{path}: tensor '{name}': "
        try:
            code = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}malformed header entry {entry!r}") from None
        dtype = dtype_from_code(code, where=where)
        spec = TensorSpec(name, dtype, shape)
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size:
            raise ValueError(f"{where}byte range [{begin}, {end}) is outside the data")
        if end - begin != spec.nbytes:
            raise ValueError(
                f"{where}shape {shape} of {code} needs {spec.nbytes} bytes, "
                f"the header gives {end - begin}"
            )
        tensors.append((begin, TensorLocation(spec, path, data_start + begin)))
    tensors.sort(key=lambda t: t[0])
    return {loc.spec.name: loc for _, loc in tensors}, dict(metadata)


class Reader:
    """Reads tensors with ``pread``; keeps one file descriptor per file until ``close``."""

    def __init__(self):
        self._fds: dict[str, int] = {}

    def read(self, loc: TensorLocation, buffer: np.ndarray | None = None) -> np.ndarray:
        """A writable, C-contiguous array holding the tensor at ``loc``: fresh, or a view of
        the first bytes of ``buffer`` (a contiguous uint8 array, reused across reads)."""
        fd = self._fd(loc.file)
        if buffer is None:
            out = np.empty(loc.spec.shape, loc.spec.dtype)
        else:
            if buffer.dtype != np.uint8 or buffer.ndim != 1 or buffer.size < loc.spec.nbytes:
                raise ValueError(f"'{loc.spec.name}' needs a uint8 buffer of at least "
                                 f"{loc.spec.nbytes} bytes, got {buffer.dtype}{list(buffer.shape)}")
            out = buffer[: loc.spec.nbytes].view(loc.spec.dtype).reshape(loc.spec.shape)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done : done + _MAX_IO]], loc.offset + done)
            if got <= 0:
                raise OSError(f"{loc.file}: unexpected end of file reading '{loc.spec.name}'")
            done += got
        return out

    def will_need(self, loc: TensorLocation) -> None:
        """Asks the kernel to start reading ``loc``'s bytes into the page cache in the
        background (``posix_fadvise(WILLNEED)``; no-op where unsupported or already cached)."""
        if hasattr(os, "posix_fadvise") and loc.spec.nbytes:
            os.posix_fadvise(self._fd(loc.file), loc.offset, loc.spec.nbytes,
                             os.POSIX_FADV_WILLNEED)

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """Bytes in "2GB" (10**9, as Hugging Face counts), "500MiB" (2**20) or a plain int."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.fullmatch(str(size))
        if not match:
            raise ValueError(f"cannot parse size {size!r}; use e.g. 2GB, 500MiB or 1000000")
        number, unit, binary = match.groups()
        power = "KMGT".find(unit.upper()) + 1 if unit else 0
        value = int(float(number) * (1024 if binary else 1000) ** power)
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in order into shards of at most ``max_shard_bytes`` (a larger tensor gets
    a shard of its own)."""
    shards, current, size = [], [], 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_name(index: int, count: int) -> str:
    """Hugging Face shard name, ``index`` counted from 0: model-00001-of-00003.safetensors, or
    model.safetensors when there is one shard."""
    if count == 1:
        return SINGLE_FILE
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": dtype_code(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned, as upstream does
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes planned shards into ``directory``, one tensor at a time, in plan order.

    ``write(name, array)`` appends the next tensor (its name, shape and dtype must be the
    planned ones); ``finish()`` checks every shard is complete and, for more than one shard,
    writes ``model.safetensors.index.json``. At most one shard file is open at a time.
    ``open_file(path)`` opens a shard for writing (an object with ``write(bytes-like)`` and
    ``close()``); default: a buffered binary file.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        shards: Sequence[Sequence[TensorSpec]],
        metadata: Mapping[str, str] | None = None,
        open_file: Callable[[str], object] | None = None,
    ):
        self._open = open_file or (lambda path: open(path, "wb"))
        self._dir = os.fspath(directory)
        self._shards = [list(s) for s in shards]
        self._metadata = {"format": "pt", **(metadata or {})}
        self._order = [(i, spec) for i, shard in enumerate(self._shards) for spec in shard]
        self._next = 0
        self._file = None
        self.weight_map: dict[str, str] = {}
        self.total_size = sum(spec.nbytes for _, spec in self._order)

    @property
    def next_spec(self) -> TensorSpec | None:
        return self._order[self._next][1] if self._next < len(self._order) else None

    def write(self, name: str, array: np.ndarray) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"tensor '{name}' written after the last planned tensor")
        shard_index, spec = self._order[self._next]
        if name != spec.name:
            raise ValueError(f"tensor '{name}' written out of order; expected '{spec.name}'")
        array = np.asarray(array)
        if array.dtype != spec.dtype or tuple(array.shape) != spec.shape:
            raise ValueError(
                f"tensor '{name}': got {array.dtype}{list(array.shape)}, planned "
                f"{spec.dtype}{list(spec.shape)}"
            )
        file_name = shard_file_name(shard_index, len(self._shards))
        if self._file is None:
            self._file = self._open(os.path.join(self._dir, file_name))
            self._file.write(_header_bytes(self._shards[shard_index], self._metadata))
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        self.weight_map[name] = file_name
        self._next += 1
        shard_done = self._next == len(self._order) or self._order[self._next][0] != shard_index
        if shard_done:
            self._file.close()
            self._file = None

    def finish(self) -> dict:
        """Checks every planned tensor has been written and returns the index, which is
        written to ``INDEX_FILE`` when there is more than one shard."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise ValueError(f"{len(self._order) - self._next} planned tensors never written, "
                             f"first '{missing}'")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
        if len(self._shards) > 1:
            with open(os.path.join(self._dir, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        return index

    def close(self) -> None:
        """Closes an open shard (after an error; the caller removes the directory)."""
        if self._file is not None:
            self._file.close()
            self._file = None
