"""The k-th largest float32 bit pattern of NumPy arrays by sampled, verified counting passes.

For non-negative float32 values the uint32 pattern is monotone in the value, so the k-th
largest value is the k-th largest pattern, and ``n(c) = count(bits >= c)`` for a cut ``c``
says on which side of the answer ``c`` lies: the answer is the largest ``c`` with
``n(c) >= k``. ``kth_largest`` keeps a bracket ``[lo, hi)`` with ``n(lo) >= k > n(hi)``:

1. A strided sample of ``s`` entries (every p-th in flatten order, p the smallest prime
   ``>= D // passes.sample``, so it does not alias with row lengths) ranks the answer near
   ``r = k s / D`` from the top; the first cuts are the sample's values at ranks
   ``r -/+ (4 sqrt(r (1 - r/s)) + 3)`` (a 4-sigma margin on the sample rank).
2. One streaming pass over all D entries, ``passes.chunk`` at a time, counts ``n(cut)`` and
   copies out the entries inside the bracket (at most a cap of them). If the counts confirm the
   bracket, the answer is the ``(k - n(hi))``-th largest of the copy.
3. Otherwise (a misleading sample, or a copy over its cap) the counts still narrow the bracket;
   further passes copy it out once it holds at most ``passes.extract_max`` entries, else cut it
   16 ways (bisection on the patterns). Exact whatever the sample: it only costs passes.

For ``k <= D/64`` the bracket is one-sided (``[lo, inf)``): one compare and one compress per
entry. A pass runs in up to ``passes.threads`` threads over contiguous runs of chunks of about
equal entry counts, at least ``passes.thread_min_entries`` each (NumPy releases the GIL).
XLA's CPU back end has no cheap stream compaction, which is why this path is NumPy.

A *source* is one leaf of scores as a tuple of flat NumPy arrays: ``(scores,)``, or ``(a, b)``
standing for ``|b - a|`` in float32, computed chunk by chunk so that no leaf-sized array of
differences is ever written. Differences that come out subnormal count as zero, as in XLA:CPU
(which flushes them) where masks are compared: counts then use ``_flush_cut`` cuts, so no chunk
pays for the flush. -0.0 counts as 0.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from cpift_jax import host

__all__ = ["HostPasses", "CountPass", "KthLargest", "kth_largest", "host_threshold",
           "source_bits", "clean", "tie_positions", "INF_BITS", "FINITE_BITS", "NEG_ZERO_BITS"]

INF_BITS = 0x7F800000  # bit pattern of +inf; every valid non-negative score is <= this
FINITE_BITS = INF_BITS - 1  # largest pattern of a finite non-negative float32
NEG_ZERO_BITS = 0x80000000
_MIN_NORMAL_BITS = 0x00800000  # patterns below this are subnormal
_Z = 4.0  # bracket half-width in standard deviations of the sample rank
_WAYS = 16  # fallback bisection: cuts per pass + 1


@dataclasses.dataclass(frozen=True)
class HostPasses:
    """Sizes of the host path's counting passes (entries unless said otherwise).

    The defaults suit a CPU: a chunk and its masks stay in cache while NumPy calls stay few, a
    131k sample brackets rank k tightly enough that one pass usually suffices, and a copy out
    is at most 16 MiB. Small settings drive the sampled, chunked, threaded passes on small
    inputs (the tests do); results are exact whatever the settings.

    Attributes:
      chunk: entries per NumPy step of a pass.
      small: inputs of at most this many entries are selected directly (no passes).
      sample: target size of the strided sample that places the first bracket.
      extract_max: most entries a bracket may hold to be copied out; a larger one is bisected.
      threads: most threads one pass runs in (the shared ``host.thread_pool()`` runs them).
      thread_min_entries: fewest entries a thread of a pass gets.
    """

    chunk: int = 1 << 18
    small: int = 1 << 16
    sample: int = 1 << 17
    extract_max: int = 1 << 22
    threads: int = dataclasses.field(default_factory=host.usable_cpus)
    thread_min_entries: int = 1 << 22

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HostPasses: {field.name} must be a positive int, got {value!r}")


DEFAULT_PASSES = HostPasses()


@dataclasses.dataclass(frozen=True)
class CountPass:
    """One streaming pass of ``kth_largest``.

    Attributes:
      cuts: the patterns counted, ascending.
      counts: ``count(bits >= cut)`` for each cut (subnormal differences counted as 0).
      bracket: ``(lo, hi)`` of the patterns asked to be copied out, ``hi`` None for no upper
        end; None for a pass that only counts.
      cap: most entries the copy may hold.
      threads: threads the pass ran in.
      run_copies: per thread, the entries it copied out, or None where its own copy went over
        ``cap`` (it stopped copying, kept counting); empty for a counting-only pass.
      copied: entries copied out in all, or None where the copy was given up (some thread's,
        or all of them together, over ``cap``) or not asked for.
    """

    cuts: tuple[int, ...]
    counts: tuple[int, ...]
    bracket: tuple[int, int | None] | None
    cap: int
    threads: int
    run_copies: tuple[int | None, ...]
    copied: int | None


@dataclasses.dataclass(frozen=True)
class KthLargest:
    """The k-th largest pattern: ``above`` entries lie above it, ``equal`` entries equal it
    (so ``above < k <= above + equal``); ``passes`` are the streaming passes it took (none
    for an input of at most ``HostPasses.small`` entries)."""

    bits: int
    above: int
    equal: int
    passes: tuple[CountPass, ...]


def _flush_cut(cut: int) -> int:
    """A cut on flushed patterns as a cut on raw ones: ``flushed >= c`` iff ``raw >= c'``."""
    return cut if cut == 0 else max(cut, _MIN_NORMAL_BITS)


def _flush(bits: np.ndarray) -> np.ndarray:
    bits[bits < _MIN_NORMAL_BITS] = 0
    return bits


def _np_bits(x: np.ndarray) -> np.ndarray:
    """uint32 patterns of ``x`` compared in float32 (a view for float32 input)."""
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    return x.view(np.uint32)


def source_bits(parts: tuple, scratch: np.ndarray | None = None) -> np.ndarray:
    """Patterns of one chunk of a source (``scratch``: a float32 buffer at least that long)."""
    if len(parts) == 1:
        return _np_bits(parts[0])
    a, b = parts
    if a.dtype != np.float32 or b.dtype != np.float32:
        a, b = a.astype(np.float32), b.astype(np.float32)
    out = np.empty(a.size, np.float32) if scratch is None else scratch[: a.size]
    np.subtract(b, a, out=out)
    return np.abs(out, out=out).view(np.uint32)


def _kth_of(bits: np.ndarray, j: int) -> int:
    """j-th largest (1-based) of a small array of patterns."""
    pos = bits.size - j
    return int(np.partition(bits, pos)[pos])


def _prime_at_least(n: int) -> int:
    n = max(2, n)
    while any(n % p == 0 for p in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def _sample(sources: list[tuple], total: int, target: int) -> tuple[np.ndarray, int]:
    """Every stride-th entry in flatten order; a prime stride does not alias with row lengths."""
    stride = 1 if total <= target else _prime_at_least(total // target)
    parts, offset = [], 0
    for source in sources:
        size = source[0].size
        start = (-offset) % stride
        if start < size:
            parts.append(source_bits(tuple(p[start::stride] for p in source)))
        offset += size
    sample = np.concatenate(parts)
    sample[sample == NEG_ZERO_BITS] = 0
    if len(sources[0]) == 2:
        _flush(sample)
    return sample, stride


def _count_chunks(chunks, cuts, extract, cap, limit, chunk_size):
    """``_count_pass`` over ``chunks`` (source tuples): ``(counts, pieces or None, ok)``."""
    a, b = extract if extract is not None else (None, None)
    # A top-open copy holds every pattern above ``limit``, so checking the copy replaces a
    # per-chunk max, and its length replaces a count: one compare and one compress per entry.
    top_open = extract is not None and b is None
    flush = len(chunks[0]) == 2 if chunks else False
    if flush:
        cuts = [_flush_cut(c) for c in cuts]
    counts = [0] * len(cuts)
    buffers = [np.empty(chunk_size, bool) for _ in cuts]
    scratch = np.empty(chunk_size, np.float32)
    pieces, n_values = [], 0
    for chunk in chunks:
        bits = source_bits(chunk, scratch)
        if not top_open and bits.max() > limit:
            return counts, None, False
        masks = [buf[: bits.size] for buf in buffers]
        for i, (cut, mask) in enumerate(zip(cuts, masks)):
            np.greater_equal(bits, cut, out=mask)
            if i != a or not top_open:
                counts[i] += np.count_nonzero(mask)
        if extract is None:
            continue
        inside = masks[a]
        if b is not None:
            np.not_equal(inside, masks[b], out=inside)  # >= lo and not >= hi
        values = np.compress(inside, bits)
        if flush:
            _flush(values)
        if top_open:
            counts[a] += values.size
            if values.size and values.max() > limit:
                return counts, None, False
        n_values += values.size
        pieces.append(values)
        if n_values > cap:  # the sample misled: keep counting, stop copying
            extract, top_open, pieces = None, False, None
    return counts, pieces, True


def _count_pass(sources, cuts, extract, cap, limit, passes: HostPasses):
    """One streaming pass over all entries, chunk by chunk, in up to ``passes.threads``
    threads (NumPy's compares and compresses release the GIL) over contiguous runs of chunks.

    Returns ``(record, values, ok)``: ``record`` a ``CountPass`` (``record.counts[i] =
    #(bits >= cuts[i])``); ``values`` the patterns in ``[cuts[a], cuts[b])`` for ``extract =
    (a, b)`` (``b`` None: no upper end), or None when more than ``cap`` of them turned up;
    ``ok`` False when some pattern lies above ``limit`` (NaN, negative, -0.0; +inf too for
    ``limit=FINITE_BITS``), in which case the counts are meaningless.
    """
    step = passes.chunk
    chunks = [tuple(p[start : start + step] for p in source) for source in sources
              for start in range(0, source[0].size, step)]
    sizes = [c[0].size for c in chunks]
    total = sum(sizes)
    threads = max(1, min(passes.threads, total // passes.thread_min_entries))
    # Run i takes the chunks that start in the i-th of ``threads`` equal shares of the entries.
    starts = np.cumsum([0] + sizes[:-1])
    owner = np.minimum(starts * threads // max(total, 1), threads - 1)
    runs = [[c for c, o in zip(chunks, owner) if o == i] for i in range(threads)]
    count = lambda run: _count_chunks(run, cuts, extract, cap, limit, step)  # noqa: E731
    results = ([count(runs[0])] if threads == 1
               else list(host.thread_pool().map(count, runs)))
    counts = [sum(r[0][i] for r in results) for i in range(len(cuts))]
    values = None
    ok = all(ok for _, _, ok in results)
    if ok and extract is not None and all(pieces is not None for _, pieces, _ in results):
        pieces = [p for _, run_pieces, _ in results for p in run_pieces]
        values = np.concatenate(pieces) if pieces else np.empty(0, np.uint32)
        if values.size > cap:
            values = None
    run_copies = () if extract is None else tuple(
        None if pieces is None else sum(p.size for p in pieces) for _, pieces, _ in results)
    bracket = None if extract is None else (
        cuts[extract[0]], None if extract[1] is None else cuts[extract[1]])
    record = CountPass(tuple(cuts), tuple(int(n) for n in counts), bracket, cap, threads,
                       run_copies, None if values is None else int(values.size))
    return record, values, ok


def _first_guess(sample: np.ndarray, stride: int, total: int, k: int):
    """Cuts around rank k read off the sample, with a 4-sigma margin on the sample rank."""
    s = sample.size
    rank = k * s / total  # expected rank of the answer among the sample, from the top
    margin = _Z * math.sqrt(rank * max(0.0, 1.0 - rank / s)) + 3.0
    r_hi, r_lo = math.floor(rank - margin), math.ceil(rank + margin)
    wanted = sorted({s - r for r in (r_hi, r_lo) if 1 <= r <= s})
    part = np.partition(sample, wanted) if wanted else sample
    lo = int(part[s - r_lo]) if r_lo <= s else 0
    if r_hi < 1 or k <= total // 64:  # one-sided: copy out everything >= lo
        return [lo], (0, None), 2 * r_lo * stride + 4096
    hi = int(part[s - r_hi]) + 1
    if hi - lo == 1:  # the bracket holds one value (ties): counts alone decide
        return [lo, hi], None, 0
    return [lo, hi], (0, 1), 2 * (r_lo - r_hi) * stride + 4096


def kth_largest(sources: list[tuple], k: int, *, passes: HostPasses = DEFAULT_PASSES,
                limit: int = INF_BITS) -> KthLargest | None:
    """The k-th largest pattern over all entries of ``sources`` (module docstring), with the
    passes it took; None when an entry lies above ``limit`` (the caller cleans up or reports
    it). ``1 <= k <= total entries``."""
    total = sum(source[0].size for source in sources)
    if total <= passes.small:
        bits = np.concatenate([source_bits(s) for s in sources])
        if bits.max() > limit:
            return None
        if len(sources[0]) == 2:
            _flush(bits)
        v = _kth_of(bits, k)
        return KthLargest(v, int(np.count_nonzero(bits > v)), int(np.count_nonzero(bits == v)), ())
    # Invariant: count(>= lo) = n_lo >= k > n_hi = count(>= hi); hi = INF_BITS + 1 means none.
    lo, n_lo, hi, n_hi = 0, total, INF_BITS + 1, 0
    cuts, extract, cap = _first_guess(*_sample(sources, total, passes.sample), total, k)
    log = []
    while True:
        record, values, ok = _count_pass(sources, cuts, extract, cap, limit, passes)
        if not ok:
            return None
        log.append(record)
        for cut, n in zip(cuts, record.counts):
            if n >= k and cut >= lo:
                lo, n_lo = cut, n
            elif n < k and cut <= hi:
                hi, n_hi = cut, n
        if values is not None:
            a, b = extract
            if cuts[a] == lo and (hi if b is None else cuts[b]) == hi:
                v = _kth_of(values, k - n_hi)
                return KthLargest(v, n_hi + int(np.count_nonzero(values > v)),
                                  int(np.count_nonzero(values == v)), tuple(log))
        if hi - lo == 1:
            return KthLargest(lo, n_hi, n_lo - n_hi, tuple(log))
        if n_lo - n_hi <= passes.extract_max:  # small enough: copy the bracket out
            if hi > INF_BITS:
                cuts, extract = [lo], (0, None)
            else:
                cuts, extract = [lo, hi], (0, 1)
            cap = n_lo - n_hi
        else:  # the sample misled: 16-way bisection of [lo, hi)
            cuts = sorted({lo + (hi - lo) * i // _WAYS for i in range(1, _WAYS)} - {lo})
            extract, cap = None, 0


def clean(path: str, flat: np.ndarray) -> np.ndarray:
    """Maps -0.0 to 0; raises on NaN or negative entries (naming leaf ``path``)."""
    if flat.size == 0 or _np_bits(flat).max() <= INF_BITS:
        return flat
    if np.isnan(flat).any() or (flat < 0).any():
        raise ValueError(
            f"threshold: scores leaf '{path}' holds NaN or negative entries; "
            "scores must be non-negative"
        )
    return np.where(flat == 0, np.zeros((), flat.dtype), flat)


def host_threshold(paths: list[str], leaves: list, k: int,
                   passes: HostPasses = DEFAULT_PASSES) -> np.float32:
    """The k-th largest value over score leaves on the CPU (``select.threshold``'s host path):
    -0.0 counts as 0, NaN or negative entries raise a ValueError naming the leaf."""
    flats = [np.asarray(x).reshape(-1) for x in leaves]  # zero-copy for CPU jax arrays
    found = kth_largest([(f,) for f in flats], k, passes=passes)
    if found is None:
        flats = [clean(p, f) for p, f in zip(paths, flats)]
        found = kth_largest([(f,) for f in flats], k, passes=passes)
    return np.uint32(found.bits).view(np.float32)


def tie_positions(sources: list[tuple], bits: int, need: int, chunk: int) -> list[int]:
    """Per source, the flat index of the last entry equal to pattern ``bits`` among the first
    ``need`` such entries in flatten order (-1: none of them; size: all of them)."""
    flush = len(sources[0]) == 2 and bits == 0  # a flushed difference equals 0 when subnormal
    scratch = np.empty(chunk, np.float32)
    out = []
    for source in sources:
        size = source[0].size
        last = size if need > 0 else -1
        for start in range(0, size if need > 0 else 0, chunk):
            piece = source_bits(tuple(p[start : start + chunk] for p in source), scratch)
            equal = piece < _MIN_NORMAL_BITS if flush else piece == bits
            count = int(np.count_nonzero(equal))
            if count >= need:
                last, need = start + int(np.flatnonzero(equal)[need - 1]), 0
                break
            need -= count
        out.append(last)
    return out
