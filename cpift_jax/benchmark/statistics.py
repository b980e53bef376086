"""Paired comparisons with bootstrap confidence intervals over seeds and test examples.

The benchmark's numbers vary for two reasons: the seed (data sample, initialisation of the
probes, batch order) and the finite test set. A comparison of two methods is *paired*: both are
run on the same seeds and scored on the same test examples, so the difference is resampled, not
each method on its own.

Data: per task ``t``, a 0/1 (or any per-example score) array ``x[t]`` of shape
``[seeds, examples_t, methods]``, the same examples for every method of a seed. A statistic maps
the per-task, per-seed, per-method means ``m[t]`` (``[seeds, methods]``) to one number, e.g. the
mean over seeds of method ``i`` minus method ``j`` (``difference_of_means``) or of their
normalised averages ``mean_t (m[t, s, i] - c_t) / (m[t, s, e] - c_t)`` against the expert ``e``
(``difference_of_normalised``).

Two-level bootstrap (Davison & Hinkley 1997, Sec. 3.8): each of ``resamples`` replicates draws
``S`` seeds with replacement (the same seeds for every task, since a seed is one run of the whole
benchmark), then, for each drawn seed and task, ``N_t`` examples with replacement (the same
examples for every method: paired). The interval is the percentile interval of the statistic
over the replicates; the verdict is read from it: *better* when its lower end is above 0,
*worse* when its upper end is below 0, else *not distinguishable*.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = ["Interval", "bootstrap", "difference_of_means", "difference_of_normalised",
           "verdict", "standard_error"]

Statistic = Callable[[Mapping[str, np.ndarray]], float]


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
    """``"better"`` (interval above 0), ``"worse"`` (below 0) or ``"not distinguishable"``."""
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


def _means(samples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {t: np.asarray(x, np.float64).mean(axis=1) for t, x in samples.items()}


def bootstrap(samples: Mapping[str, np.ndarray], statistic: Statistic, *,
              resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> Interval:
    """The statistic on ``samples`` and its two-level paired bootstrap interval (module doc).

    Args:
      samples: task -> ``[seeds, examples, methods]`` per-example scores.
      statistic: task -> ``[seeds, methods]`` means -> float.
      resamples, confidence, seed: replicates, interval level, and the generator's seed (the
        interval is a pure function of the inputs).
    """
    n_seeds, _ = _check(samples)
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples}, "
                         f"{confidence}")
    rng = np.random.default_rng(seed)
    data = {t: np.asarray(x, np.float64) for t, x in samples.items()}
    values = np.empty(resamples)
    for r in range(resamples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        means = {}
        for task, x in data.items():
            n = x.shape[1]
            rows = rng.integers(0, n, (n_seeds, n))  # examples per drawn seed, shared by methods
            means[task] = np.take_along_axis(x[seeds], rows[:, :, None], axis=1).mean(axis=1)
        values[r] = statistic(means)
    alpha = (1 - confidence) / 2
    finite = values[np.isfinite(values)]
    low, high = (np.quantile(finite, [alpha, 1 - alpha]) if finite.size == resamples
                 else (np.nan, np.nan))  # a replicate with no defined value: no interval
    return Interval(estimate=float(statistic(_means(samples))), low=float(low), high=float(high),
                    confidence=confidence, resamples=resamples)


def difference_of_means(i: int, j: int, tasks: Sequence[str] | None = None) -> Statistic:
    """Mean over seeds and ``tasks`` (default: all) of method ``i``'s score minus ``j``'s."""

    def statistic(means):
        chosen = list(means) if tasks is None else list(tasks)
        return float(np.mean([np.mean(means[t][:, i] - means[t][:, j]) for t in chosen]))

    return statistic


def difference_of_normalised(i: int, j: int, expert: int, chance: Mapping[str, float]) -> Statistic:
    """Mean over seeds of ``norm_i - norm_j`` with ``norm_m = mean_t (m_t - c_t) / (e_t - c_t)``
    (``e_t`` the expert's score, ``c_t`` the chance level); NaN when an expert is at chance."""

    def statistic(means):
        gaps = {t: means[t][:, expert] - chance[t] for t in means}
        if any(np.any(g == 0) for g in gaps.values()):
            return float("nan")
        norm = {m: np.mean([(means[t][:, m] - chance[t]) / gaps[t] for t in means], axis=0)
                for m in (i, j)}
        return float(np.mean(norm[i] - norm[j]))

    return statistic


def standard_error(scores: np.ndarray) -> float:
    """Standard error of a mean of per-example scores: ``sd / sqrt(n)`` (ddof 1)."""
    scores = np.asarray(scores, np.float64).ravel()
    if scores.size < 2:
        return float("nan")
    return float(scores.std(ddof=1) / np.sqrt(scores.size))
