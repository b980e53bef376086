"""Host-side I/O of the streaming merge: aligned staging buffers handed to XLA without copies,
reads into reused buffers, spare outputs, and O_DIRECT shard writing with its fallbacks."""

from __future__ import annotations

import errno
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from cpift_jax.streaming import direct_write, host_buffers
from cpift_jax.models import safetensors_io as st


@pytest.mark.parametrize("nbytes", [1, 63, 4096, 1_000_003])
def test_aligned_empty_starts_on_the_alignment(nbytes):
    for alignment in (64, 4096):
        buf = host_buffers.aligned_empty(nbytes, alignment)
        assert buf.dtype == np.uint8 and buf.size == nbytes
        assert buf.ctypes.data % alignment == 0


def test_to_jax_aliases_aligned_float_buffers_and_copies_misaligned_ones():
    buf = host_buffers.aligned_empty(4 * 1024 + 4)
    aligned = buf[:4096].view(np.float32)
    aligned[:] = np.arange(1024, dtype=np.float32)
    x, stored = host_buffers.to_jax(aligned)
    assert stored is None
    aligned[0] = 42.0  # visible through the jax array: no copy was made
    assert float(x[0]) == 42.0

    misaligned = buf[4:].view(np.float32)  # 4 bytes past a 64-byte boundary
    misaligned[:] = 7.0
    y, stored = host_buffers.to_jax(misaligned)
    misaligned[0] = 0.0
    assert stored is None and float(y[0]) == 7.0  # a copy
    np.testing.assert_array_equal(np.asarray(y[1:]), misaligned[1:])


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn])
def test_to_jax_carries_types_dlpack_lacks_as_raw_bits(dtype):
    values = np.linspace(-2, 2, 256).astype(dtype)
    buf = host_buffers.aligned_empty(values.nbytes)
    view = buf.view(dtype)
    view[:] = values
    x, stored = host_buffers.to_jax(view)
    assert stored == np.dtype(dtype) and x.dtype == jnp.dtype(f"uint{np.dtype(dtype).itemsize * 8}")
    restored = host_buffers.from_storage(x, stored)
    assert restored.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(restored), values)
    assert host_buffers.from_storage(x, None) is x


def test_staging_buffers_are_reused_per_slot_and_input():
    staging = host_buffers.Staging([100, 0, 50], slots=2)
    first = staging.buffer(0, 0)
    assert staging.buffer(0, 0) is first and staging.buffer(1, 0) is not first
    assert first.size == 100 and staging.buffer(0, 2).size == 50
    assert staging.holds(first[10:20].view(np.uint16)) and not staging.holds(np.zeros(10))
    assert staging.nbytes == 100 + 100 + 50


def test_spare_pool_returns_arrays_by_shape_and_dtype_up_to_its_cap():
    pool = host_buffers.SparePool(per_shape=1)
    a, b = jnp.zeros((2, 3)), jnp.ones((2, 3))
    pool.put(a)
    pool.put(b)  # over the cap: dropped
    assert pool.take((3, 2), jnp.float32) is None
    assert pool.take((2, 3), jnp.int32) is None
    assert pool.take((2, 3), jnp.float32) is a
    assert pool.take((2, 3), jnp.float32) is None


def test_reader_reads_into_a_reused_buffer_or_names_a_short_one(tmp_path):
    specs = [st.TensorSpec("a", np.dtype(np.float32), (3, 5)),
             st.TensorSpec("b", np.dtype(ml_dtypes.bfloat16), (7,))]
    values = {"a": np.arange(15, dtype=np.float32).reshape(3, 5),
              "b": np.arange(7).astype(ml_dtypes.bfloat16)}
    writer = st.ShardedWriter(tmp_path, [specs])
    for spec in specs:
        writer.write(spec.name, values[spec.name])
    writer.finish()
    locations, _ = st.read_header(tmp_path / st.shard_file_name(0, 1))
    buffer = host_buffers.aligned_empty(64)
    with st.Reader() as reader:
        for name in ("a", "b"):
            got = reader.read(locations[name], buffer)
            assert np.shares_memory(got, buffer) and got.dtype == values[name].dtype
            np.testing.assert_array_equal(got, values[name])
            np.testing.assert_array_equal(reader.read(locations[name]), values[name])
        with pytest.raises(ValueError, match="'a' needs a uint8 buffer of at least 60 bytes"):
            reader.read(locations["a"], np.empty(59, np.uint8))


def chunks(seed=0, count=40):
    """Byte strings of awkward sizes (not block multiples), some larger than the bounce."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 30_000, count)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


SMALL_BOUNCE = 2 * direct_write.BLOCK  # chunks() then crosses many bounce-buffer boundaries


@pytest.mark.parametrize("direct", [True, False])
def test_sequential_writer_writes_exactly_the_bytes_given(tmp_path, direct):
    data = chunks()
    path = str(tmp_path / "out.bin")
    with direct_write.SequentialWriter(path, direct=direct, bounce_bytes=SMALL_BOUNCE) as writer:
        for chunk in data:
            writer.write(chunk)
    with open(path, "rb") as f:
        assert f.read() == b"".join(data)


def test_sequential_writer_falls_back_when_open_refuses_o_direct(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    path = str(tmp_path / "out.bin")
    with direct_write.SequentialWriter(path) as writer:
        assert not writer.direct
        for chunk in chunks(1):
            writer.write(chunk)
    with open(path, "rb") as f:
        assert f.read() == b"".join(chunks(1))


def test_sequential_writer_falls_back_when_the_first_direct_write_is_refused(
        tmp_path, monkeypatch):
    monkeypatch.setattr(os, "pwrite", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EINVAL, "Invalid argument")))
    path = str(tmp_path / "out.bin")
    with direct_write.SequentialWriter(path, bounce_bytes=SMALL_BOUNCE) as writer:
        for chunk in chunks(2):
            writer.write(chunk)
        assert not writer.direct
    with open(path, "rb") as f:
        assert f.read() == b"".join(chunks(2))


def test_direct_shards_load_in_the_reference_reader(tmp_path):
    rng = np.random.default_rng(3)
    specs = [st.TensorSpec(f"t{i}", np.dtype(np.float32), (int(rng.integers(1, 900)),))
             for i in range(12)]
    values = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in specs}
    shards = st.plan_shards(specs, 8000)
    writer = st.ShardedWriter(
        tmp_path, shards, open_file=lambda path: direct_write.SequentialWriter(path, direct=True,
                                                            bounce_bytes=SMALL_BOUNCE))
    for spec in specs:
        writer.write(spec.name, values[spec.name])
    writer.finish()
    loaded = {}
    for i in range(len(shards)):
        loaded.update(load_file(tmp_path / st.shard_file_name(i, len(shards))))
    assert set(loaded) == set(values)
    for name, want in values.items():
        np.testing.assert_array_equal(loaded[name], want)
