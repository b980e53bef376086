"""Paired comparisons with bootstrap confidence intervals over seeds and test examples.

The benchmark's numbers vary for two reasons: the seed (data sample, initialisation of the
probes, batch order) and the finite test set. A comparison of two methods is *paired*: both are
run on the same seeds and scored on the same test examples, so the difference is resampled, not
each method on its own.

Data: per task ``t``, a 0/1 (or any per-example score) array ``x[t]`` of shape
``[seeds, examples_t, methods]``, the same examples for every method of a seed. A statistic maps
the per-task, per-seed, per-method means ``m[t]`` (``[..., seeds, methods]``; the leading axes
are bootstrap replicates) to one number per replicate, e.g. the mean over seeds of method ``i``
minus method ``j`` (``difference_of_means``) or of their normalised averages
``mean_t (m[t, s, i] - c_t) / (m[t, s, e] - c_t)`` against the expert ``e``
(``difference_of_normalised``, the same rule as the report's normalisation: a (seed, task) whose
expert is less than ``MIN_EXPERT_GAP`` above the floor ``c_t`` is left out).

Two-level bootstrap (Davison & Hinkley 1997, Sec. 3.8): each of ``resamples`` replicates draws
``S`` seeds with replacement (the same seeds for every task, since a seed is one run of the whole
benchmark), then, for each drawn seed and task, ``N_t`` examples with replacement (the same
examples for every method: paired). The interval is the percentile interval of the statistic
over the replicates; the verdict is read from it: *better* when its lower end is above 0,
*worse* when its upper end is below 0, else *not distinguishable*. A replicate whose statistic is
not finite (e.g. every expert drawn at chance) leaves the interval undefined (NaN, verdict
``"undefined"``) rather than silently dropping it.

Vectorised: an example draw is stored as per-example counts (``bincount`` of the drawn indices),
so a replicate's means are one matrix product per seed; 2000 replicates over 5 seeds x 500
examples x 5 tasks take about 0.2 s on one CPU core (``resampled_means``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np

__all__ = ["MIN_EXPERT_GAP", "Interval", "bootstrap", "bootstrap_many", "resampled_means",
           "means", "percentile_interval", "difference_of_means", "difference_of_normalised",
           "normalised", "verdict", "standard_error", "bootstrap_standard_error"]

# A (seed, task) whose expert is less than this above the floor carries no signal and is left
# out of a normalised average (aggregate.NORMALIZATION states the same rule).
MIN_EXPERT_GAP = 0.05

# task -> [..., seeds, methods] means -> [...] values (one per leading index)
Statistic = Callable[[Mapping[str, np.ndarray]], np.ndarray]

_BLOCK_ELEMENTS = 1 << 17  # drawn example indices per block: small blocks stay in cache


@dataclasses.dataclass(frozen=True)
class Interval:
    """A statistic's value on the data and its bootstrap percentile interval."""

    estimate: float
    low: float
    high: float
    confidence: float
    resamples: int

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "verdict": self.verdict}


def verdict(low: float, high: float) -> str:
    """``"better"`` (interval above 0), ``"worse"`` (below 0) or ``"not distinguishable"``;
    ``"undefined"`` when an end is not finite."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "undefined"
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "not distinguishable"


def _check(samples: Mapping[str, np.ndarray]) -> tuple[int, int]:
    if not samples:
        raise ValueError("bootstrap needs at least one task")
    shapes = {t: np.shape(x) for t, x in samples.items()}
    for task, shape in shapes.items():
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"task {task!r}: expected a [seeds, examples, methods] array with "
                             f"no empty axis, got shape {shape}")
    seeds = {s[0] for s in shapes.values()}
    methods = {s[2] for s in shapes.values()}
    if len(seeds) != 1 or len(methods) != 1:
        raise ValueError(f"every task needs the same seeds and methods; got shapes {shapes}")
    return seeds.pop(), methods.pop()


def means(samples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """task -> ``[seeds, methods]`` means over the examples (the observed data's means)."""
    _check(samples)
    return {t: np.asarray(x, np.float64).mean(axis=1) for t, x in samples.items()}


def resampled_means(samples: Mapping[str, np.ndarray], resamples: int,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """task -> ``[resamples, seeds, methods]``: the means of each two-level bootstrap replicate
    (module doc). Slot ``k`` of replicate ``r`` holds drawn seed ``drawn[r, k]`` with its own
    draw of examples, shared by every method. A pure function of its inputs."""
    n_seeds, n_methods = _check(samples)
    if resamples < 1:
        raise ValueError(f"need resamples >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_seeds, (resamples, n_seeds))  # the same seeds for every task
    out = {}
    for task, x in samples.items():
        x = np.asarray(x, np.float64)
        n = x.shape[1]
        result = np.empty((resamples * n_seeds, n_methods))
        block = max(1, _BLOCK_ELEMENTS // n)  # (replicate, slot) rows per block
        flat_seeds = drawn.ravel()
        for start in range(0, resamples * n_seeds, block):
            stop = min(start + block, resamples * n_seeds)
            rows = stop - start
            picks = rng.integers(0, n, (rows, n))
            picks += np.arange(rows)[:, None] * n  # row-wise offsets: one bincount for all
            counts = np.bincount(picks.ravel(), minlength=rows * n).reshape(rows, n)
            counts = counts.astype(np.float64)
            for s in range(n_seeds):
                chosen = np.flatnonzero(flat_seeds[start:stop] == s)
                if chosen.size:
                    result[start + chosen] = counts[chosen] @ x[s]
        out[task] = (result / n).reshape(resamples, n_seeds, n_methods)
    return out


def percentile_interval(estimate: float, values: np.ndarray, confidence: float) -> Interval:
    """The percentile interval of the replicate ``values`` (NaN ends if any is not finite)."""
    if not 0 < confidence < 1:
        raise ValueError(f"need 0 < confidence < 1, got {confidence}")
    values = np.asarray(values, np.float64)
    alpha = (1 - confidence) / 2
    if np.all(np.isfinite(values)):
        low, high = np.quantile(values, [alpha, 1 - alpha])
    else:  # a replicate with no defined value: no interval
        low = high = np.nan
    return Interval(estimate=float(estimate), low=float(low), high=float(high),
                    confidence=float(confidence), resamples=int(values.size))


def bootstrap_many(samples: Mapping[str, np.ndarray], statistics: Mapping[Hashable, Statistic],
                   *, resamples: int = 2000, confidence: float = 0.95,
                   seed: int = 0) -> dict[Hashable, Interval]:
    """``bootstrap`` of several statistics on the same replicates (one resampling for all)."""
    if not 0 < confidence < 1:
        raise ValueError(f"need 0 < confidence < 1, got {confidence}")
    observed = means(samples)
    replicates = resampled_means(samples, resamples, seed)
    return {key: percentile_interval(float(fn(observed)), fn(replicates), confidence)
            for key, fn in statistics.items()}


def bootstrap(samples: Mapping[str, np.ndarray], statistic: Statistic, *,
              resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """The statistic on ``samples`` and its two-level paired bootstrap interval (module doc).

    Args:
      samples: task -> ``[seeds, examples, methods]`` per-example scores.
      statistic: task -> ``[..., seeds, methods]`` means -> ``[...]`` values.
      resamples, confidence, seed: replicates, interval level, and the generator's seed (the
        interval is a pure function of the inputs).
    """
    return bootstrap_many(samples, {0: statistic}, resamples=resamples, confidence=confidence,
                          seed=seed)[0]


def difference_of_means(i: int, j: int, tasks: Sequence[str] | None = None) -> Statistic:
    """Mean over seeds and ``tasks`` (default: all) of method ``i``'s score minus ``j``'s."""

    def statistic(m):
        chosen = list(m) if tasks is None else list(tasks)
        return np.mean([(m[t][..., i] - m[t][..., j]).mean(axis=-1) for t in chosen], axis=0)

    return statistic


def normalised(m: Mapping[str, np.ndarray], method: int, expert: int,
               chance: Mapping[str, float], min_gap: float = MIN_EXPERT_GAP) -> np.ndarray:
    """``[..., seeds]`` normalised averages of ``method``: per seed, the mean over tasks of
    ``(m_t - c_t) / (e_t - c_t)`` over the tasks whose expert gap ``e_t - c_t`` is at least
    ``min_gap`` (and above 0); NaN for a seed with no such task."""
    tasks = list(m)
    gaps = np.stack([m[t][..., expert] - chance[t] for t in tasks])
    kept = (gaps >= min_gap) & (gaps > 0)
    terms = np.stack([m[t][..., method] - chance[t] for t in tasks])
    ratios = np.where(kept, terms / np.where(kept, gaps, 1.0), 0.0)
    count = kept.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, ratios.sum(axis=0) / count, np.nan)


def difference_of_normalised(i: int, j: int, expert: int, chance: Mapping[str, float],
                             min_gap: float = MIN_EXPERT_GAP) -> Statistic:
    """Mean over seeds of ``norm_i - norm_j`` (``normalised``); NaN when a seed keeps no task."""

    def statistic(m):
        return (normalised(m, i, expert, chance, min_gap)
                - normalised(m, j, expert, chance, min_gap)).mean(axis=-1)

    return statistic


def standard_error(scores: np.ndarray) -> float:
    """Standard error of a mean of per-example scores: ``sd / sqrt(n)`` (ddof 1)."""
    scores = np.asarray(scores, np.float64).ravel()
    if scores.size < 2:
        return float("nan")
    return float(scores.std(ddof=1) / np.sqrt(scores.size))


def bootstrap_standard_error(replicates: np.ndarray) -> np.ndarray:
    """Standard error of the mean over seeds from two-level replicate means
    ``[resamples, seeds, ...]``: the std (ddof 1) over replicates of the seed mean, so it counts
    both the seed-to-seed and the finite-test-set variation."""
    seed_means = np.asarray(replicates, np.float64).mean(axis=1)
    if seed_means.shape[0] < 2:
        return np.full(seed_means.shape[1:], np.nan)
    return seed_means.std(axis=0, ddof=1)
