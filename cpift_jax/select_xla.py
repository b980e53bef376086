"""The k-th largest float32 value under ``jit``: radix select on two 16-bit digits, shardable.

For non-negative float32 values the uint32 pattern is monotone in the value; write it as
``hi * 2^16 + lo`` with 16-bit digits. Pass 1 histograms the high digits, ``h1[d]``; the
answer's high digit is the largest ``d`` with ``sum_{d' >= d} h1[d'] >= k``, and its rank
among the entries with that digit is ``k' = k - sum_{d' > d} h1[d']``. Pass 2 histograms the
low digits of those entries and picks the low digit by the same rule with ``k'``. Exact, two
reads of the data, no sort.

Scatter-adds run over 64k-entry chunks in a ``fori_loop`` so no leaf-sized temporary is
written. With ``axis_name`` each histogram is ``psum``-ed, so a model sharded over a 1-D mesh
is ranked globally. On CPU this is slower than ``np.partition`` (XLA CPU scatter costs ~1 ns
per entry); it exists for jit-compatibility, accelerators and sharding. -0.0 counts as 0;
NaN or negative scores make the result NaN (no exception can be raised under ``jit``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from cpift_jax.select_host import INF_BITS, NEG_ZERO_BITS

__all__ = ["kth_largest", "kth_largest_jit", "count_above_and_equal"]

_CHUNK = 1 << 16  # entries per fori_loop step


def _jnp_bits(x: jax.Array) -> jax.Array:
    """uint32 patterns in float32, -0.0 mapped to +0.0."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits == jnp.uint32(NEG_ZERO_BITS), jnp.uint32(0), bits)


def _fold_chunks(x: jax.Array, step, init):
    """``step(acc, float32_chunk)`` over the flattened leaf in ``_CHUNK``-entry slices.

    A ``fori_loop`` over slices keeps every temporary chunk-sized; a whole-leaf expression
    would make XLA write a leaf-sized intermediate (page faults cost more than the work).
    """
    flat, f32 = x.reshape(-1), jnp.float32
    n_full = flat.size // _CHUNK
    acc = init
    if n_full:
        acc = lax.fori_loop(
            0,
            n_full,
            lambda i, a: step(a, lax.dynamic_slice(flat, (i * _CHUNK,), (_CHUNK,)).astype(f32)),
            acc,
        )
    if flat.size % _CHUNK:
        acc = step(acc, flat[n_full * _CHUNK :].astype(f32))
    return acc


def _high_digit(bits: jax.Array) -> jax.Array:
    # Patterns above +inf (NaN, negatives) go to digit 0xFFFF, which no valid score has.
    return jnp.where(bits > jnp.uint32(INF_BITS), 0xFFFF, bits >> 16).astype(jnp.int32)


def _pick_digit(hist: jax.Array, k) -> tuple[jax.Array, jax.Array]:
    """Largest digit d with count(digit >= d) >= k, and k's rank within that digit."""
    at_least = jnp.cumsum(hist[::-1])[::-1]
    digit = jnp.sum(at_least >= k) - 1
    return digit, k - (at_least[digit] - hist[digit])


def kth_largest(leaves: list[jax.Array], k: int, axis_name=None) -> jax.Array:
    """The k-th largest value over ``leaves`` as a float32 scalar (NaN if a score is NaN or
    negative); with ``axis_name`` over all shards of that mesh axis. Histograms count in
    int32, so the caller keeps the entry count below 2^31."""

    def reduce(hist):
        return hist if axis_name is None else lax.psum(hist, axis_name)

    def high_step(hist, chunk):
        return hist.at[_high_digit(_jnp_bits(chunk))].add(1)

    hist = jnp.zeros(1 << 16, jnp.int32)
    for leaf in leaves:
        hist = _fold_chunks(leaf, high_step, hist)
    hist = reduce(hist)
    invalid = hist[0xFFFF] > 0
    high, k_low = _pick_digit(hist, k)

    def low_step(hist, chunk):
        bits = _jnp_bits(chunk)
        idx = jnp.where(_high_digit(bits) == high, (bits & 0xFFFF).astype(jnp.int32), 1 << 16)
        return hist.at[idx].add(1, mode="drop")

    hist = jnp.zeros(1 << 16, jnp.int32)
    for leaf in leaves:
        hist = _fold_chunks(leaf, low_step, hist)
    low, _ = _pick_digit(reduce(hist), k_low)
    bits = (high.astype(jnp.uint32) << 16) | low.astype(jnp.uint32)
    value = lax.bitcast_convert_type(bits, jnp.float32)
    return jnp.where(invalid, jnp.float32(jnp.nan), value)


kth_largest_jit = jax.jit(kth_largest, static_argnums=(1, 2))


def count_above_and_equal(x: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(count(x > v), count(x == v))`` as int32, compared in float32 (NaN matches nothing).

    Chunked like ``kth_largest``, so no leaf-sized temporary is written; jit-friendly.
    """
    v = jnp.asarray(v, jnp.float32)

    def step(acc, chunk):
        return (
            acc[0] + jnp.sum(chunk > v, dtype=jnp.int32),
            acc[1] + jnp.sum(chunk == v, dtype=jnp.int32),
        )

    zero = jnp.zeros((), jnp.int32)
    return _fold_chunks(x, step, (zero, zero))
