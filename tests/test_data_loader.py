"""The per-process loader on 8 faked devices in one process: global batches equal the
random-access source, carry the batch sharding, and resume exactly from a saved state (the
two-process version is in test_distributed.py)."""

import itertools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cpift_jax.data import batching, loader

SEQ = 5


def _arrays(n, offset):
    tokens = (np.arange(n)[:, None] * 10 + offset + np.arange(SEQ)[None]).astype(np.int32)
    return {"tokens": tokens, "loss_mask": tokens % 4 == 1}


def _source(batch_size=8):
    arrays = {"a": _arrays(5, 0), "b": _arrays(9, 1000)}
    return batching.MixtureBatches(arrays, {"a": 0.4, "b": 0.6}, batch_size, 3)


def _mesh(shape, axes):
    return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


@pytest.mark.parametrize("shape,spec", [((8,), P("data")), ((4, 2), P("data")),
                                        ((2, 4), P(("data", "fsdp")))])
def test_loader_gives_the_source_batches_with_the_batch_sharding(shape, spec):
    mesh = _mesh(shape, ("data", "fsdp")[: len(shape)])
    sharding = NamedSharding(mesh, spec)
    it = loader.GlobalBatchLoader(_source(), sharding, SEQ)
    assert (it.lo, it.hi) == (0, 8)  # one process holds every row
    reference = list(itertools.islice(batching.mixture_batches(
        {"a": _arrays(5, 0), "b": _arrays(9, 1000)}, {"a": 0.4, "b": 0.6}, 8, 3), 6))
    for expected in reference:
        batch = next(it)
        for key in ("tokens", "loss_mask"):
            assert batch[key].sharding == sharding and batch[key].shape == (8, SEQ)
            np.testing.assert_array_equal(np.asarray(batch[key]), expected[key])


def test_loader_state_resumes_the_stream_exactly():
    sharding = NamedSharding(_mesh((8,), ("data",)), P("data"))
    it = loader.GlobalBatchLoader(_source(), sharding, SEQ)
    for _ in range(4):
        next(it)
    state = it.get_state()
    assert state == {"next_index": 4}
    expected = [np.asarray(next(it)["tokens"]) for _ in range(3)]
    fresh = loader.GlobalBatchLoader(_source(), sharding, SEQ)  # a restarted process
    fresh.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(np.asarray(next(fresh)["tokens"]), e)
    started = loader.GlobalBatchLoader(_source(), sharding, SEQ, start=4)
    np.testing.assert_array_equal(np.asarray(next(started)["tokens"]), expected[0])


def test_local_rows_follow_the_addressable_shards():
    sharding = NamedSharding(_mesh((8,), ("data",)), P("data"))
    assert loader.local_rows(sharding, (16, SEQ)) == (0, 16)
    replicated = NamedSharding(_mesh((8,), ("data",)), P())
    assert loader.local_rows(replicated, (16, SEQ)) == (0, 16)
