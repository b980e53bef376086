"""Exact non-negative counts in two uint32 limbs, for counts that cross leaves and shards.

Counting at any size. Each leaf shard is counted in int32 (so a leaf shard holds fewer than
2^31 entries, checked at trace time). Every count that crosses leaves or shards is a ``Count``:
two uint32 limbs ``hi * 2^16 + lo`` with ``lo < 2^16``. Before a ``psum`` each shard's ``lo``
is below 2^16, so the summed ``lo`` stays below 2^31 for up to 2^15 shards, and the summed
``hi`` is the global count over 2^16; after it the carry ``lo >> 16`` moves into ``hi``.
Suffix sums over the 2^16 bins stay below 2^32 in ``lo`` and ``hi``. Exact for fewer than
2^47 entries in all (a 7B model has 2^32.6) and ``k`` given as a Python int split at trace
time. No ``jax_enable_x64`` needed.

Used by the radix select of ``select_xla``, which re-exports the public names.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["Count", "count_of", "count_const", "count_add", "count_sub", "count_ge",
           "count_index", "count_nonzero", "count_psum", "pick_digit", "MAX_SHARDS"]

MAX_SHARDS = 2**15  # shards one psum may combine (lo limbs < 2^16 each)
_LIMB = np.uint32(0xFFFF)  # a NumPy constant: importing this module starts no backend


class Count(NamedTuple):
    """An exact non-negative count ``hi * 2^16 + lo`` (uint32 arrays, ``lo < 2^16``)."""

    hi: jax.Array
    lo: jax.Array


def _carry(hi: jax.Array, lo: jax.Array) -> Count:
    return Count(hi + (lo >> 16), lo & _LIMB)


def count_of(x: jax.Array) -> Count:
    """A ``Count`` from non-negative int32 counts."""
    x = x.astype(jnp.uint32)
    return Count(x >> 16, x & _LIMB)


def count_const(k: int) -> Count:
    """A ``Count`` from a Python int, split at trace time (``0 <= k < 2^48``)."""
    if not 0 <= k < 2**48:
        raise ValueError(f"count_const: {k} is outside [0, 2^48)")
    return Count(jnp.uint32(k >> 16), jnp.uint32(k & 0xFFFF))


def count_add(a: Count, b: Count) -> Count:
    return _carry(a.hi + b.hi, a.lo + b.lo)


def count_sub(a: Count, b: Count) -> Count:
    """``a - b`` for ``a >= b`` (borrow from ``hi`` when ``a.lo < b.lo``)."""
    borrow = a.lo < b.lo
    lo = jnp.where(borrow, a.lo + jnp.uint32(1 << 16), a.lo) - b.lo
    return Count(a.hi - b.hi - borrow.astype(jnp.uint32), lo)


def count_ge(a: Count, b: Count) -> jax.Array:
    return (a.hi > b.hi) | ((a.hi == b.hi) & (a.lo >= b.lo))


def count_index(c: Count, i) -> Count:
    """Entry ``i`` of an array of counts."""
    return Count(c.hi[i], c.lo[i])


def count_nonzero(c: Count) -> jax.Array:
    """Where the count is above 0."""
    return (c.hi | c.lo) > 0


def count_psum(c: Count, axes: tuple) -> Count:
    """``c`` summed over the shards of mesh ``axes`` (none: unchanged), carries normalised."""
    if not axes:
        return c
    shards = math.prod(lax.axis_size(a) for a in axes)
    if shards > MAX_SHARDS:
        raise ValueError(f"count_psum: {shards} shards over mesh axes {axes}; the 16-bit low "
                         f"limbs stay exact for at most {MAX_SHARDS}")
    return _carry(lax.psum(c.hi, axes), lax.psum(c.lo, axes))


def pick_digit(hist: Count, k: Count) -> tuple[jax.Array, Count]:
    """Largest digit d with ``count(digit >= d) >= k``, and k's rank within that digit.

    ``hist`` holds one ``Count`` per digit (arrays of 2^16). Suffix sums are exact: ``lo``
    sums stay below ``2^16 * 2^16``, ``hi`` sums are the total over 2^16.
    """
    at_least = _carry(jnp.cumsum(hist.hi[::-1], dtype=jnp.uint32)[::-1],
                      jnp.cumsum(hist.lo[::-1], dtype=jnp.uint32)[::-1])
    digit = jnp.sum(count_ge(at_least, k), dtype=jnp.int32) - 1
    above = count_sub(count_index(at_least, digit), count_index(hist, digit))
    return digit, count_sub(k, above)
