"""The k-th largest float32 value and exact top-k masks under ``jit`` and ``shard_map``: radix
select on two 16-bit digits, with counts that cannot overflow.

For non-negative float32 values the uint32 pattern is monotone in the value; write it as
``hi * 2^16 + lo`` with 16-bit digits. Pass 1 histograms the high digits, ``h1[d]``; the
answer's high digit is the largest ``d`` with ``sum_{d' >= d} h1[d'] >= k``, and its rank
among the entries with that digit is ``k' = k - sum_{d' > d} h1[d']``. Pass 2 histograms the
low digits of those entries and picks the low digit by the same rule with ``k'``. Exact, two
reads of the data, no sort.

Counting at any size: each leaf shard is counted in int32 (so a leaf shard holds fewer than
2^31 entries, checked at trace time); every count that crosses leaves or shards is an exact
two-limb ``Count`` (``limb_counts``, whose names are re-exported here).

Sharded leaves (inside ``shard_map``): each leaf's histograms are ``psum``-ed over exactly the
mesh axes that leaf is sharded on (``axes``; leaves with the same axes share one ``psum``), so
a copy replicated over another axis is counted once. Loop carries are cast to the leaf's
varying axes, so the default ``check_vma=True`` holds.

Two entry points: ``kth_largest`` traces all leaves into the caller's program (a threshold
inside a user's ``jit``); the ``leaf_*`` passes take one leaf each, so exact top-k masks
(``masks.core_mask`` on devices) compile one small program per leaf shape whatever the depth.

Scatter-adds run over 64k-entry chunks in a ``fori_loop`` so no leaf-sized temporary is
written. A source is an array of scores or a pair ``(a, b)`` standing for ``|b - a|`` in
float32, computed chunk by chunk. On CPU this is slower than ``np.partition`` (XLA CPU scatter
costs ~1 ns per entry); it exists for jit-compatibility, accelerators and sharding. -0.0
counts as 0; NaN or negative scores make the result NaN (no exception can be raised under
``jit``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

# The two-limb counts live in `limb_counts`; re-exported (see __all__) for callers.
from cpift_jax.limb_counts import (  # noqa: F401
    MAX_SHARDS,
    Count,
    count_add,
    count_const,
    count_ge,
    count_index,
    count_nonzero,
    count_of,
    count_psum,
    count_sub,
    pick_digit,
)
from cpift_jax.select_host import INF_BITS, NEG_ZERO_BITS

__all__ = ["Count", "LeafLayout", "count_of", "count_const", "count_add", "count_sub",
           "count_ge", "count_psum", "pick_digit", "leaf_axes", "kth_largest", "kth_largest_jit",
           "leaf_high_histogram", "leaf_low_histogram", "digits_value", "leaf_above_and_equal",
           "leaf_mask", "leaf_mask_cut", "count_above_and_equal", "SHARD_LIMIT", "MAX_SHARDS"]

_CHUNK = 1 << 16  # entries per fori_loop step
_BINS = 1 << 16  # one histogram bin per 16-bit digit; index _BINS is dropped
SHARD_LIMIT = 2**31  # entries of one leaf shard (counted in int32)


# ------------------------------------------------------------------------------ leaves, shards


def leaf_axes(axis_name, n: int) -> list[tuple[str, ...]]:
    """Per-leaf psum axes from ``axis_name``: None, a mesh axis, a tuple of mesh axes (every
    leaf), or a list with one such entry per leaf."""

    def one(a):
        if a is None:
            return ()
        if isinstance(a, str):
            return (a,)
        if isinstance(a, tuple) and all(isinstance(x, str) for x in a):
            return a
        raise ValueError(f"axis_name: expected None, a mesh axis name or a tuple of them, got {a!r}")

    if isinstance(axis_name, list):
        if len(axis_name) != n:
            raise ValueError(f"axis_name: a list needs one entry per leaf ({n}), got {len(axis_name)}")
        return [one(a) for a in axis_name]
    return [one(axis_name)] * n


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """Where a shard sits in its leaf: the leaf's global shape and the mesh axes each dimension
    is split over (a ``PartitionSpec``'s entries as tuples). Gives global row-major indices."""

    shape: tuple[int, ...]
    dim_axes: tuple[tuple[str, ...], ...]

    @staticmethod
    def from_spec(shape, spec) -> "LeafLayout":
        entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
        dims = tuple(() if e is None else ((e,) if isinstance(e, str) else tuple(e)) for e in entries)
        return LeafLayout(tuple(int(s) for s in shape), dims)

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(a for dim in self.dim_axes for a in dim)

    def global_index(self, local_shape, flat: jax.Array) -> jax.Array:
        """Global row-major index (uint32) of local row-major positions ``flat`` (uint32)."""
        index, stride = jnp.zeros_like(flat), 1
        for size, local, axes in reversed(list(zip(self.shape, local_shape, self.dim_axes))):
            coord = flat % jnp.uint32(local)
            flat = flat // jnp.uint32(local)
            if axes:
                coord = coord + lax.axis_index(axes).astype(jnp.uint32) * jnp.uint32(local)
            index = index + coord * jnp.uint32(stride)
            stride *= size
        return index


def _leaf(src):
    return src[0] if isinstance(src, tuple) else src


def _varying(x) -> frozenset:
    """Mesh axes ``x`` varies over inside ``shard_map`` (empty outside or with check_vma=False)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def _varying_zeros(src, shape, dtype) -> jax.Array:
    """Zeros typed as varying like ``src``, so a loop carry matches what the body adds."""
    axes = _varying(_leaf(src))
    zeros = jnp.zeros(shape, dtype)
    return lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def _check_sources(sources, axes, paths) -> None:
    for j, (src, ax) in enumerate(zip(sources, axes)):
        name = paths[j] if paths else f"#{j}"
        leaf = _leaf(src)
        if leaf.size >= SHARD_LIMIT:
            raise ValueError(f"scores leaf '{name}': {leaf.size} entries in one shard; the xla path "
                             f"counts each leaf shard in int32 (shard the leaf below 2^31)")
        varying = _varying(leaf)
        if varying and varying != frozenset(ax):
            raise ValueError(f"scores leaf '{name}' is sharded over mesh axes {sorted(varying)} but "
                             f"axis_name gives {ax}: psum over exactly the axes a leaf is sharded on")


def _chunk_scores(src, start, size) -> jax.Array:
    def piece(x):
        """Entries ``start : start + size`` of ``x`` in float32. bfloat16 is sliced as its
        16-bit patterns and widened by a shift (exact): XLA:CPU computes bfloat16 slices in
        float32 and hoists that conversion out of the loop, writing a float32 copy of the
        whole leaf (4 bytes per entry); as patterns the hoisted copy is 2 bytes per entry
        (accelerators slice bfloat16 natively and copy nothing)."""
        flat = x.reshape(-1)
        if flat.dtype == jnp.bfloat16:
            flat = lax.bitcast_convert_type(flat, jnp.uint16)
        if size != x.size:
            flat = lax.dynamic_slice(flat, (start,), (size,))
        if flat.dtype == jnp.uint16:
            return lax.bitcast_convert_type(flat.astype(jnp.uint32) << 16, jnp.float32)
        return flat.astype(jnp.float32)

    if isinstance(src, tuple):
        a, b = src
        return jnp.abs(piece(b) - piece(a))
    return piece(src)


def _fold_chunks(src, step, init):
    """``step(acc, float32_chunk, start)`` over the flattened source in ``_CHUNK``-entry slices.

    A ``fori_loop`` over slices keeps every temporary chunk-sized; a whole-leaf expression
    would make XLA write a leaf-sized intermediate (page faults cost more than the work).
    """
    size = _leaf(src).size
    n_full = size // _CHUNK
    acc = init
    if n_full:
        acc = lax.fori_loop(0, n_full,
                            lambda i, a: step(a, _chunk_scores(src, i * _CHUNK, _CHUNK), i * _CHUNK),
                            acc)
    if size % _CHUNK:
        acc = step(acc, _chunk_scores(src, n_full * _CHUNK, size % _CHUNK), n_full * _CHUNK)
    return acc


def _score_bits(x: jax.Array) -> jax.Array:
    """uint32 patterns in float32, -0.0 mapped to +0.0."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits == jnp.uint32(NEG_ZERO_BITS), jnp.uint32(0), bits)


def _high_digit(bits: jax.Array) -> jax.Array:
    # Patterns above +inf (NaN, negatives) go to digit 0xFFFF, which no valid score has.
    return jnp.where(bits > jnp.uint32(INF_BITS), 0xFFFF, bits >> 16).astype(jnp.int32)


def _local_histogram(src, digit_of) -> jax.Array:
    """int32 histogram of ``digit_of(chunk, start)`` (index ``_BINS`` is dropped) over a shard."""

    def step(hist, chunk, start):
        return hist.at[digit_of(chunk, start)].add(1, mode="drop")

    return _fold_chunks(src, step, _varying_zeros(src, _BINS, jnp.int32))


def _histogram(sources, axes, digit_of) -> Count:
    """Global ``Count`` histogram of ``digit_of`` over all sources."""
    groups: dict[tuple, Count] = {}
    for src, ax in zip(sources, axes):
        h = count_of(_local_histogram(src, digit_of))
        groups[ax] = count_add(groups[ax], h) if ax in groups else h
    total = None
    for ax, c in groups.items():
        c = count_psum(c, ax)
        total = c if total is None else count_add(total, c)
    return total


def _kth_largest(sources, k: Count, axes) -> jax.Array:
    """The k-th largest value over all sources (NaN if a score is NaN or negative)."""
    hist = _histogram(sources, axes, lambda c, _: _high_digit(_score_bits(c)))
    invalid = count_nonzero(count_index(hist, 0xFFFF))
    high, k_low = pick_digit(hist, k)

    low, _ = pick_digit(_histogram(sources, axes, _low_digit_among(high)), k_low)
    return jnp.where(invalid, jnp.float32(jnp.nan), digits_value(high, low))


def kth_largest(sources: list, k: int, axis_name=None, paths: tuple[str, ...] | None = None
                ) -> jax.Array:
    """The k-th largest score over ``sources`` (arrays, or pairs ``(a, b)`` for ``|b - a|``)
    as a float32 scalar, NaN if a score is NaN or negative. ``axis_name`` (``leaf_axes``):
    the mesh axes each leaf is sharded on inside ``shard_map``; k counts over all shards.
    ``paths`` name the leaves in errors."""
    axes = leaf_axes(axis_name, len(sources))
    _check_sources(sources, axes, paths)
    return _kth_largest(sources, count_const(k), axes)


kth_largest_jit = jax.jit(kth_largest, static_argnums=(1, 2, 3))


# --------------------------------------------------------------- exact top-k, one leaf at a time
#
# The passes of an exact top-k over many leaves, each over ONE leaf (a shard of it inside
# ``shard_map``, with ``layout`` saying where the shard sits), so that a caller compiles one
# program per leaf shape and sums the returned counts across leaves itself:
#   1. ``leaf_high_histogram``: high-digit histogram (+ NaN/Inf flag); sum; ``pick_digit`` with k;
#   2. ``leaf_low_histogram``: low digits of the entries with that high digit; sum; ``pick_digit``
#      with the rank left; ``digits_value`` gives the threshold v;
#   3. ``leaf_above_and_equal``: entries above v and equal to v; the caller hands the k - above
#      entries equal to v to the leaves in order (earliest first);
#   4. ``leaf_mask`` (a leaf takes all or none of its entries equal to v) or ``leaf_mask_cut``
#      (it takes its first ``rank`` ones in global row-major order).
# Every count returned is a ``Count`` summed over the leaf's sharded mesh axes (replicated).


def _check_leaf(src, layout: LeafLayout) -> None:
    _check_sources([src], [layout.axes], None)


def leaf_high_histogram(src, layout: LeafLayout) -> tuple[Count, jax.Array]:
    """Pass 1 over one leaf: the ``Count`` histogram of the scores' high digits, and whether
    the leaf holds NaN, negative or Inf scores (high digits 0xFFFF and +inf's 0x7F80)."""
    _check_leaf(src, layout)
    hist = _histogram([src], [layout.axes], lambda c, _: _high_digit(_score_bits(c)))
    bad = (count_nonzero(count_index(hist, INF_BITS >> 16))
           | count_nonzero(count_index(hist, 0xFFFF)))
    return hist, bad


def _low_digit_among(high: jax.Array):
    """Low digit of scores whose high digit is ``high``; ``_BINS`` (dropped) for the others."""

    def low_digit(chunk, _):
        bits = _score_bits(chunk)
        return jnp.where(_high_digit(bits) == high, (bits & 0xFFFF).astype(jnp.int32), _BINS)

    return low_digit


def leaf_low_histogram(src, layout: LeafLayout, high: jax.Array) -> Count:
    """Pass 2 over one leaf: the ``Count`` histogram of the low digits of the scores whose high
    digit is ``high`` (int32 scalar)."""
    _check_leaf(src, layout)
    return _histogram([src], [layout.axes], _low_digit_among(high))


def digits_value(high: jax.Array, low: jax.Array) -> jax.Array:
    """The float32 value whose bits are ``high * 2^16 + low``."""
    bits = (high.astype(jnp.uint32) << 16) | low.astype(jnp.uint32)
    return lax.bitcast_convert_type(bits, jnp.float32)


def leaf_above_and_equal(src, layout: LeafLayout, v: jax.Array) -> tuple[Count, Count]:
    """Pass 3 over one leaf: ``(count(score > v), count(score == v))`` as ``Count``s."""
    _check_leaf(src, layout)
    n_above, n_equal = count_above_and_equal(src, v)
    return (count_psum(count_of(n_above), layout.axes),
            count_psum(count_of(n_equal), layout.axes))


def _scores_and_index(src, layout: LeafLayout):
    """Whole-shard float32 scores and global row-major indices (elementwise, fused by XLA)."""
    leaf = _leaf(src)
    scores = _chunk_scores(src, 0, leaf.size).reshape(leaf.shape)
    flat = lax.iota(jnp.uint32, max(1, leaf.size))[: leaf.size].reshape(leaf.shape)
    return scores, layout.global_index(leaf.shape, flat)


def _tie_cut(src, layout: LeafLayout, v, rank: Count) -> jax.Array:
    """Global index of the ``rank``-th entry equal to ``v`` in row-major order (uint32).

    The same two-digit radix select, on reversed index digits so "largest" means "earliest".
    """
    local_shape = _leaf(src).shape
    axes = [layout.axes]

    def index_of(chunk, start):
        flat = jnp.uint32(start) + lax.iota(jnp.uint32, chunk.size)
        return layout.global_index(local_shape, flat), chunk == v

    def high_digit(chunk, start):
        index, tied = index_of(chunk, start)
        return jnp.where(tied, 0xFFFF - (index >> 16).astype(jnp.int32), _BINS)

    high, rank_low = pick_digit(_histogram([src], axes, high_digit), rank)

    def low_digit(chunk, start):
        index, tied = index_of(chunk, start)
        keep = tied & (0xFFFF - (index >> 16).astype(jnp.int32) == high)
        return jnp.where(keep, 0xFFFF - (index & 0xFFFF).astype(jnp.int32), _BINS)

    low, _ = pick_digit(_histogram([src], axes, low_digit), rank_low)
    return ((0xFFFF - high).astype(jnp.uint32) << 16) | (0xFFFF - low).astype(jnp.uint32)


def _check_tie_positions(layout: LeafLayout) -> None:
    if math.prod(layout.shape) >= 2**32:
        raise ValueError(f"scores leaf of shape {layout.shape}: {math.prod(layout.shape)} entries; "
                         f"tie positions are uint32 (leaves below 2^32)")


def leaf_mask(src, layout: LeafLayout, v: jax.Array, ties: jax.Array) -> jax.Array:
    """Pass 4 over one leaf: the entries above ``v``, and those equal to it when ``ties``."""
    _check_leaf(src, layout)
    scores, _ = _scores_and_index(src, layout)
    return (scores > v) | ((scores == v) & ties)


def leaf_mask_cut(src, layout: LeafLayout, v: jax.Array, rank: Count) -> jax.Array:
    """Pass 4 over the one leaf where the ties are cut: the entries above ``v`` and the first
    ``rank`` (``1 <= rank <= count(score == v)``) entries equal to ``v`` in global row-major
    order, found by two more counting passes (``_tie_cut``)."""
    _check_leaf(src, layout)
    _check_tie_positions(layout)
    last = _tie_cut(src, layout, v, rank)
    scores, index = _scores_and_index(src, layout)
    return (scores > v) | ((scores == v) & (index <= last))


def count_above_and_equal(x, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(count(x > v), count(x == v))`` as int32, compared in float32 (NaN matches nothing);
    ``x`` an array or a pair ``(a, b)`` for ``|b - a|``.

    Chunked like ``kth_largest``, so no leaf-sized temporary is written; jit-friendly.
    """
    v = jnp.asarray(v, jnp.float32)

    def step(acc, chunk, _):
        return (
            acc[0] + jnp.sum(chunk > v, dtype=jnp.int32),
            acc[1] + jnp.sum(chunk == v, dtype=jnp.int32),
        )

    zero = _varying_zeros(x, (), jnp.int32)
    return _fold_chunks(x, step, (zero, zero))
