"""The benchmark's paired comparisons: per-example arrays from a workdir, and their intervals.

``per_example`` gathers, for each task, the held-out per-example values of every method on
every seed into one ``[seeds, examples, methods]`` float64 array (the layout of
``cpift_jax.benchmark.statistics``). Method keys are those of ``results.json``:
``"single_task"`` (the seed's single-task expert of each task, from stage ``experts``),
``"base"`` (the base model, from stage ``experts``), ``"fused_only"`` (stage ``fusion``) and
every other key its own stage (``"multitask_sft"``, ``"cpift"``, ``"ablation_*"``,
``"merge_*"``).

``compare`` turns pairs ``(a, b)`` into the difference of normalised averages ``a - b`` with the
expert ``"single_task"`` and the given floors (``statistics.difference_of_normalised``: per seed,
mean over tasks of ``(score - floor) / (expert - floor)``, a (seed, task) whose expert is less
than ``statistics.MIN_EXPERT_GAP`` above the floor left out), and its two-level paired bootstrap
interval over seeds and examples. ``analyse`` does the same and also returns the per-seed
differences and each method's standard errors (per task, and of its normalised average), all
from one resampling.

``forgetting_intervals`` gives the forgetting pair's ``drop_a`` (score on A after A -> B minus
after A) and ``gain_b`` (score on B after A -> B minus the base model's) per method with paired
intervals (``statistics.difference_of_means``), from the per-example values that
``cpift_jax.benchmark.forgetting.run_seed`` records.

The scores here are means of per-example values. For exact match and multiple choice that is
the task's score itself; for a pooled metric (bits per byte of held-out text) it is the mean of
the per-example values, close to but not identical with the pooled score in the tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from cpift_jax.benchmark import statistics

__all__ = ["EXPERT", "BASE", "stage_of", "per_example", "Analysis", "analyse", "compare",
           "forgetting_intervals"]

EXPERT, BASE = "single_task", "base"
_STAGES = {EXPERT: "experts", BASE: "experts", "fused_only": "fusion"}


def stage_of(method: str) -> str:
    """The per-seed stage whose result holds ``method``'s scores."""
    return _STAGES.get(method, method)


def _values(result, stage: str, method: str, task: str) -> list:
    if not isinstance(result, dict):
        raise ValueError(f"stage {stage}: result is not a dict, got {result!r:.80}")
    if result.get("status") == "not_applicable":
        raise ValueError(f"stage {stage}: method {method!r} was not applicable "
                         f"({result.get('reason', 'no reason given')}); it has no scores")
    if method == EXPERT:
        table = result.get("per_example", {}).get(task, {})
        key = "per_example"
    elif method == BASE:
        table, key = result.get("base_per_example", {}), "base_per_example"
    else:
        table, key = result.get("per_example", {}), "per_example"
    if task not in table:
        raise ValueError(f"stage {stage}: result has no {key!r} values of task {task!r} "
                         f"(method {method!r}); was it written by an older cpift_jax? Rerun "
                         "that stage (delete its DONE.json) to record per-example values")
    return table[task]


def per_example(wd, config, tasks: Sequence[str], methods: Sequence[str]) -> dict[str, np.ndarray]:
    """task -> float64 ``[seeds, examples, len(methods)]`` from the completed stages of ``wd``
    (a Workdir) for ``config.seeds``. Raises ValueError naming the stage when a stage lacks
    per-example values, or the stage and task when example counts differ between methods or
    seeds (the paired bootstrap needs the same examples for every method of a seed and the same
    count on every seed)."""
    seeds = [int(s) for s in config.seeds]
    results = {}  # (seed, stage) -> result, each DONE.json read once

    def result(seed, stage):
        if (seed, stage) not in results:
            results[(seed, stage)] = wd.result(f"seed{seed}/{stage}")
        return results[(seed, stage)]

    out = {}
    for task in tasks:
        rows, reference = [], None
        for seed in seeds:
            columns = []
            for method in methods:
                stage = f"seed{seed}/{stage_of(method)}"
                values = np.asarray(_values(result(seed, stage_of(method)), stage, method, task),
                                    np.float64)
                if values.ndim != 1 or values.size == 0:
                    raise ValueError(f"stage {stage}: per-example values of task {task!r} must "
                                     f"be a non-empty list of numbers, got shape {values.shape}")
                if reference is None:
                    reference = (stage, values.size)
                elif values.size != reference[1]:
                    raise ValueError(
                        f"stage {stage}: task {task!r} has {values.size} per-example values "
                        f"but stage {reference[0]} has {reference[1]}; paired comparisons need "
                        "the same held-out examples for every method and seed")
                columns.append(values)
            rows.append(np.stack(columns, axis=1))
        out[task] = np.stack(rows)
    return out


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Intervals of the pairs, per-seed differences and standard errors."""
    intervals: dict[tuple[str, str], statistics.Interval]
    per_seed: dict[tuple[str, str], tuple[float, ...]]  # norm_a - norm_b per seed
    standard_errors: dict[str, dict[str, float]]  # method -> task -> SE of the seed mean
    normalised_errors: dict[str, float]  # method -> SE of the mean normalised average


def analyse(samples: Mapping[str, np.ndarray], methods: Sequence[str],
            floors: Mapping[str, float], pairs: Sequence[tuple[str, str]], *,
            resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
            min_gap: float = statistics.MIN_EXPERT_GAP) -> Analysis:
    """``compare`` on arrays (``per_example``'s layout; ``methods`` names their last axis,
    ``EXPERT`` among them), plus the per-seed normalised differences of each pair and every
    method's standard errors of its per-task scores and of its normalised average (the std over
    the same replicates of the mean over seeds: over seeds and examples)."""
    methods = list(methods)
    wanted = {m for pair in pairs for m in pair} | {EXPERT}
    missing = sorted(wanted - set(methods))
    if missing:
        raise ValueError(f"methods {missing} are compared but have no per-example values "
                         f"(have: {methods})")
    col = {m: i for i, m in enumerate(methods)}
    missing_floors = [t for t in samples if t not in floors]
    if missing_floors:
        raise ValueError(f"no floor (chance level or base score) for task(s) {missing_floors}")
    floors = {t: float(floors[t]) for t in samples}
    observed = statistics.means(samples)
    replicates = statistics.resampled_means(samples, resamples, seed)
    intervals, per_seed = {}, {}
    for a, b in pairs:
        fn = statistics.difference_of_normalised(col[a], col[b], col[EXPERT], floors, min_gap)
        intervals[(a, b)] = statistics.percentile_interval(float(fn(observed)), fn(replicates),
                                                           confidence)
        diff = (statistics.normalised(observed, col[a], col[EXPERT], floors, min_gap)
                - statistics.normalised(observed, col[b], col[EXPERT], floors, min_gap))
        per_seed[(a, b)] = tuple(float(v) for v in diff)
    errors = {t: statistics.bootstrap_standard_error(r) for t, r in replicates.items()}
    standard_errors = {m: {t: float(errors[t][i]) for t in samples} for m, i in col.items()}
    normalised_errors = {}
    for m, i in col.items():
        values = statistics.normalised(replicates, i, col[EXPERT], floors, min_gap).mean(axis=-1)
        normalised_errors[m] = (float(values.std(ddof=1)) if resamples > 1
                                and np.all(np.isfinite(values)) else float("nan"))
    return Analysis(intervals, per_seed, standard_errors, normalised_errors)


def compare(wd, config, tasks: Sequence[str], floors: Mapping[str, float],
            pairs: Sequence[tuple[str, str]], *, resamples: int = 2000,
            confidence: float = 0.95, seed: int = 0) -> dict[tuple[str, str], statistics.Interval]:
    """For each ``(a, b)``: the difference of normalised averages ``a - b`` (expert
    ``"single_task"``, ``floors`` per task) with its paired two-level bootstrap interval over
    seeds and examples (module doc)."""
    methods = list(dict.fromkeys([EXPERT, *(m for pair in pairs for m in pair)]))
    samples = per_example(wd, config, tasks, methods)
    return analyse(samples, methods, floors, pairs, resamples=resamples, confidence=confidence,
                   seed=seed).intervals


def _forgetting_columns(results: Mapping, method: str, pair: Sequence[str]) -> dict:
    """``{"drop_a": [seeds, examples, 2], "gain_b": ...}``: per seed, the paired per-example
    values (after A -> B, reference) of ``method``; ValueError naming the stage when they are
    missing or their counts differ."""
    a, b = pair
    columns = {"drop_a": [], "gain_b": []}
    for s, result in results.items():
        stage = f"seed{int(s)}/forgetting"
        values = result.get(method, {}).get("per_example")
        if not values:
            raise ValueError(f"stage {stage}: method {method!r} has no per-example values; "
                             "was it written by an older cpift_jax? Rerun that stage (delete "
                             "its DONE.json) to record them")
        try:
            pairs = {"drop_a": (values["after_ab"][a], values["after_a"][a]),
                     "gain_b": (values["after_ab"][b], values["base_b"])}
        except KeyError as err:
            raise ValueError(f"stage {stage}: per-example values of {method!r} lack "
                             f"{err}") from None
        for field, (x, y) in pairs.items():
            if len(x) != len(y) or not x:
                raise ValueError(f"stage {stage}: {method!r} {field} compares {len(x)} with "
                                 f"{len(y)} per-example values; expected the same examples")
            columns[field].append(np.stack([np.asarray(x, np.float64),
                                            np.asarray(y, np.float64)], axis=1))
    for field, stacked in columns.items():
        if len({c.shape for c in stacked}) != 1:
            raise ValueError(f"stage seed<s>/forgetting: {method!r} {field} has different "
                             f"example counts across seeds {[c.shape[0] for c in stacked]}")
    return {field: np.stack(stacked) for field, stacked in columns.items()}


def _difference_of_drops(means):
    """``[..., seeds, 4]`` means (after A -> B, after A of one method, then the other's) -> the
    mean over seeds of the first method's drop minus the second's."""
    (m,) = means.values()
    return ((m[..., 0] - m[..., 1]) - (m[..., 2] - m[..., 3])).mean(axis=-1)


def forgetting_intervals(wd, seeds: Sequence[int], pair: Sequence[str], methods: Sequence[str], *,
                         resamples: int = 2000, confidence: float = 0.95, seed: int = 0,
                         difference: tuple[str, str] | None = None
                         ) -> dict[str, dict[str, statistics.Interval]]:
    """method -> ``{"drop_a": Interval, "gain_b": Interval}`` from the stages
    ``seed<s>/forgetting`` of ``wd`` (module doc); ValueError naming the stage when a method's
    per-example values are missing or their counts differ. With ``difference = (m1, m2)``, also
    ``"<m1>_minus_<m2>": {"drop_a": Interval}``: m1's drop on A minus m2's, paired on A's
    examples (the same draws of seeds and examples as the drops)."""
    a, b = pair
    results = {s: wd.result(f"seed{int(s)}/forgetting") for s in seeds}
    wanted = list(methods) + [m for m in (difference or ()) if m not in methods]
    columns = {m: _forgetting_columns(results, m, pair) for m in wanted}
    bootstrap = dict(resamples=resamples, confidence=confidence, seed=seed)
    out = {m: {field: statistics.bootstrap({task: columns[m][field]},
                                           statistics.difference_of_means(0, 1), **bootstrap)
               for field, task in (("drop_a", a), ("gain_b", b))}
           for m in methods}
    if difference is not None:
        m1, m2 = difference
        x, y = columns[m1]["drop_a"], columns[m2]["drop_a"]
        if x.shape != y.shape:
            raise ValueError(f"stage seed<s>/forgetting: task {a!r} has {x.shape[:2]} "
                             f"(seeds, examples) for {m1!r} but {y.shape[:2]} for {m2!r}; "
                             "expected the same examples for every method")
        out[f"{m1}_minus_{m2}"] = {"drop_a": statistics.bootstrap(
            {a: np.concatenate([x, y], axis=-1)}, _difference_of_drops, **bootstrap)}
    return out
