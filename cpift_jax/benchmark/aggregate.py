"""The CPI-FT benchmark's results: ``Results`` (frozen dataclasses) built from a workdir's stages.

``collect`` reads the completed stages' ``DONE.json`` results and aggregates over seeds (mean and
population std, ``np.std``) into a ``Results``, with the paired comparisons the report states
(``comparison_pairs``; ``cpift_jax.benchmark.comparisons``) and each method's standard errors;
``Results.save`` writes ``results.json`` and ``Results.load`` reads it back, for
``cpift_jax.benchmark.report`` and ``plots``. The file's layout lives in
``cpift_jax.benchmark.results_json`` (``Results.to_json`` / ``Results.from_json`` call it): the
reader names the file and key of anything malformed and refuses a file of another ``FORMAT``.
Every setting the report shows (the core fraction ``p`` included) is a stored field, copied from
the config when the results are collected.

Normalisation (``NORMALIZATION``): per seed and task, ``(score - chance) / (expert - chance)``
with the same seed's single-task expert, averaged over the tasks whose expert beats chance by at
least ``MIN_EXPERT_GAP``; a task whose expert is at chance carries no signal and is left out
(all left out: NaN).

Statistics (``cpift_jax.benchmark.statistics``, one two-level paired bootstrap over seeds and
held-out examples, ``resamples`` replicates): ``Stat.se`` of a per-task score or a normalised
average is the standard error of its mean over seeds, counting both the seed-to-seed and the
finite-test-set variation; ``Results.comparisons`` holds, for each pair ``(a, b)``, the mean
over seeds of ``norm_a - norm_b`` with its percentile interval, verdict and per-seed values; a
``ForgettingRow`` holds intervals of ``drop_a`` and ``gain_b``. These fields are optional in
``results.json`` (a file written before them still loads; the report then says they were not
computed).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from cpift_jax.benchmark import comparisons as comparisons_lib
from cpift_jax.benchmark import statistics
from cpift_jax.benchmark.statistics import Interval
from cpift_jax.training.checkpoints import read_json, write_json

__all__ = ["FORMAT", "BLOCKS", "MAIN_ORDER", "OK", "NOT_APPLICABLE", "NORMALIZATION",
           "BASE_NORMALIZATION",
           "MIN_EXPERT_GAP", "COMPARISON_STATISTIC", "Stat", "SeedScores", "MethodRow",
           "ForgettingRow", "Forgetting", "Overlap", "CoreDensity", "Timings", "PairedComparison",
           "Comparisons", "Results", "normalized_average", "stat", "comparison_pairs", "collect",
           "timings"]

FORMAT = 2  # results.json layout; bump on an incompatible change (old files are then refused)
BLOCKS = ("main", "ablation", "merge_only")
# Row order of the main block: the paper's Table 1 order, baselines first, CPI-FT last; any other
# main key follows in insertion order. Other blocks keep insertion order.
MAIN_ORDER = ("single_task", "multitask_sft", "multitask_sft_equal_steps", "multistage_random",
              "multistage_heuristic", "fused_only", "cpift")
OK, NOT_APPLICABLE = "ok", "not_applicable"  # a method row's status

MIN_EXPERT_GAP = statistics.MIN_EXPERT_GAP
COMPARISON_STATISTIC = (
    "difference of the normalised average (A - B), mean over seeds of the per-seed differences; "
    "percentile interval of a two-level paired bootstrap (seeds drawn with replacement, then each "
    "drawn seed's held-out examples, the same draw for both methods); better / worse when the "
    "interval lies above / below 0, else not distinguishable")
NORMALIZATION = (
    "avg_normalized = mean over tasks t of (score_t - chance_t) / (expert_t - chance_t), with "
    "expert_t the same seed's single-task expert and chance_t the best constant answer's score; "
    f"tasks whose expert is less than {MIN_EXPERT_GAP} above chance are left out (all left out: "
    "NaN); 1 = expert level, 0 = chance; mean and population std over seeds.")
BASE_NORMALIZATION = (
    "avg_normalized = mean over tasks t of (score_t - base_t) / (expert_t - base_t), with "
    "expert_t the same seed's single-task expert and base_t the base model's score (the floor "
    "of real tasks, where chance is not one number); tasks whose expert gains less than "
    f"{MIN_EXPERT_GAP} over the base model are left out (all left out: NaN); 1 = expert level, "
    "0 = base model; mean and population std over seeds.")


# ------------------------------------------------------------------------------ the dataclasses

@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean and population std over seeds (NaN mean: no seed had a value); ``se``: standard
    error of the mean over seeds and examples (two-level bootstrap), None when not computed."""
    mean: float
    std: float
    se: float | None = None


@dataclasses.dataclass(frozen=True)
class SeedScores:
    seed: int
    per_task: dict[str, float]
    avg_normalized: float


@dataclasses.dataclass(frozen=True)
class MethodRow:
    """One row of the report. ``status`` is ``OK`` (scores present) or ``NOT_APPLICABLE`` (the
    operator cannot apply to this setting, ``reason`` says why; no scores)."""
    label: str
    block: str  # one of BLOCKS
    budget: str
    status: str = OK
    reason: str = ""
    per_task: dict[str, Stat] = dataclasses.field(default_factory=dict)
    avg_normalized: Stat | None = None
    per_seed: tuple[SeedScores, ...] = ()

    @property
    def applicable(self) -> bool:
        return self.status == OK


@dataclasses.dataclass(frozen=True)
class ForgettingRow:
    label: str
    drop_a: Stat
    gain_b: Stat
    drop_a_interval: Interval | None = None  # paired bootstrap over seeds and examples
    gain_b_interval: Interval | None = None


@dataclasses.dataclass(frozen=True)
class Forgetting:
    pair: tuple[str, str]  # (A, B): trained on A, then on B
    methods: dict[str, ForgettingRow]


@dataclasses.dataclass(frozen=True)
class Overlap:
    tasks: tuple[str, ...]
    matrix: tuple[tuple[float, ...], ...]  # Jaccard, mean over seeds
    per_seed: tuple[tuple[tuple[float, ...], ...], ...]


@dataclasses.dataclass(frozen=True)
class CoreDensity:
    """Share of a group's entries that are core, by layer and by parameter kind."""
    by_layer: dict[str, float]
    by_kind: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Timings:
    total_s: float
    stages: dict[str, float]


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """``a`` minus ``b`` on the normalised average (``COMPARISON_STATISTIC``): the interval, and
    the difference on each seed (in ``Results.seeds`` order)."""
    a: str
    b: str
    block: str  # the block of the row it qualifies (``a``'s): one of BLOCKS
    interval: Interval
    per_seed: tuple[float, ...]

    @property
    def verdict(self) -> str:
        return self.interval.verdict


@dataclasses.dataclass(frozen=True)
class Comparisons:
    """The paired comparisons the report states, with how they were computed."""
    statistic: str
    resamples: int
    confidence: float
    examples: dict[str, int]  # held-out examples per task (per seed)
    pairs: tuple[PairedComparison, ...]

    def find(self, a: str, b: str) -> PairedComparison | None:
        return next((p for p in self.pairs if (p.a, p.b) == (a, b)), None)


@dataclasses.dataclass(frozen=True)
class Results:
    """Everything ``results.json`` holds. The optional sections are None when not run."""
    config: dict
    core_fraction: float  # p of the main CPI-FT row (config.cpift.p)
    seeds: tuple[int, ...]
    tasks: tuple[str, ...]
    chance: dict[str, float]
    normalization: str
    methods: dict[str, MethodRow]
    forgetting: Forgetting | None = None
    overlap: Overlap | None = None
    groups: tuple[tuple[tuple[str, ...], ...], ...] | None = None  # per seed, in stage order
    core_density: dict[str, CoreDensity] | None = None  # seed 0, per task
    timings: Timings | None = None
    metrics: dict[str, str] | None = None  # task -> what its score measures (None: exact match)
    comparisons: Comparisons | None = None

    def methods_in(self, block: str) -> list[str]:
        """Keys of the methods in ``block``, in report order."""
        return _methods_in(self.methods, block)

    def to_json(self) -> dict:
        from cpift_jax.benchmark import results_json  # it imports this module
        return results_json.to_json(self)

    @classmethod
    def from_json(cls, data: Any, source: str = "results") -> Results:
        """Parses ``to_json``'s layout; ValueError naming ``source`` and the key of the first
        malformed value (or the format, for a file written by an older version)."""
        from cpift_jax.benchmark import results_json  # it imports this module
        return results_json.from_json(data, source)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json(), sort_keys=False)  # insertion order is report order

    @classmethod
    def load(cls, path: str | Path) -> Results:
        return cls.from_json(read_json(path), source=str(path))


def _methods_in(methods: dict[str, MethodRow], block: str) -> list[str]:
    keys = [k for k, m in methods.items() if m.block == block]
    if block == "main":
        keys = [k for k in MAIN_ORDER if k in keys] + [k for k in keys if k not in MAIN_ORDER]
    return keys


# ------------------------------------------------------------------------------ aggregation

def normalized_average(scores: dict, expert: dict, chance: dict) -> float:
    """``NORMALIZATION`` for one seed: ``{task: score}`` against ``{task: expert score}``."""
    terms = [(scores[t] - chance[t]) / (expert[t] - chance[t]) for t in scores
             if expert[t] - chance[t] >= MIN_EXPERT_GAP]
    return float(np.mean(terms)) if terms else float("nan")


def stat(values) -> Stat:
    values = [float(v) for v in values]
    return Stat(float(np.mean(values)), float(np.std(values)))


def _method(label, block, budget, per_seed_scores: dict, experts: dict, chance,
            tasks) -> MethodRow:
    per_seed = tuple(SeedScores(s, {t: float(sc[t]) for t in tasks},
                                normalized_average(sc, experts[s], chance))
                     for s, sc in per_seed_scores.items())
    return MethodRow(label, block, budget,
                     per_task={t: stat([r.per_task[t] for r in per_seed]) for t in tasks},
                     avg_normalized=stat([r.avg_normalized for r in per_seed]),
                     per_seed=per_seed)


def comparison_pairs(methods: dict[str, MethodRow]) -> list[tuple[str, str, str]]:
    """``(a, b, block)`` of every comparison the report states, in report order: CPI-FT minus
    each other scored main method, each ablation minus CPI-FT, each merge-only operator minus
    CPI-FT and minus the single-task experts (the experts are measured on every run, so that
    pair exists even without a ``single_task`` row)."""
    scored = {k for k, m in methods.items() if m.applicable}
    cpift = "cpift" in scored
    out = [("cpift", k, "main") for k in _methods_in(methods, "main")
           if cpift and k != "cpift" and k in scored]
    out += [(k, "cpift", "ablation") for k in _methods_in(methods, "ablation")
            if cpift and k in scored]
    for k in _methods_in(methods, "merge_only"):
        if k in scored:
            out += [(k, "cpift", "merge_only")] if cpift else []
            out.append((k, comparisons_lib.EXPERT, "merge_only"))
    return out


def _with_statistics(config, wd, tasks, floors, rows: dict[str, MethodRow], *, resamples,
                     confidence, seed) -> tuple[dict[str, MethodRow], Comparisons]:
    """``rows`` with standard errors, and the comparisons of ``comparison_pairs``."""
    expert = comparisons_lib.EXPERT
    keys = list(dict.fromkeys([expert, *(k for k, m in rows.items() if m.applicable)]))
    samples = comparisons_lib.per_example(wd, config, tasks, keys)
    pairs = comparison_pairs(rows)
    analysis = comparisons_lib.analyse(samples, keys, floors, [(a, b) for a, b, _ in pairs],
                                       resamples=resamples, confidence=confidence, seed=seed)
    with_se = {}
    for k, m in rows.items():
        if m.applicable:
            errors = analysis.standard_errors[k]
            per_task = {t: dataclasses.replace(s, se=errors[t]) for t, s in m.per_task.items()}
            m = dataclasses.replace(
                m, per_task=per_task,
                avg_normalized=dataclasses.replace(m.avg_normalized,
                                                   se=analysis.normalised_errors[k]))
        with_se[k] = m
    found = Comparisons(COMPARISON_STATISTIC, int(resamples), float(confidence),
                        {t: int(samples[t].shape[1]) for t in tasks},
                        tuple(PairedComparison(a, b, block, analysis.intervals[(a, b)],
                                               analysis.per_seed[(a, b)])
                              for a, b, block in pairs))
    return with_se, found


def collect(config, wd, tasks, chance, *, labels, budgets, ablations,
            forgetting_labels, normalization: str = NORMALIZATION,
            metrics: dict[str, str] | None = None, resamples: int = 2000,
            confidence: float = 0.95, bootstrap_seed: int = 0) -> Results:
    """The ``Results`` (no timings) from the completed stages of ``wd`` (a Workdir).

    A merge-only stage whose result is ``{"status": "not_applicable", "reason": ...}`` on any
    seed gives a not-applicable row with that reason. ``resamples``, ``confidence`` and
    ``bootstrap_seed`` set the paired bootstrap (module doc); every scored stage must hold
    per-example values (``comparisons.per_example`` names a stage that does not)."""
    seeds = tuple(int(s) for s in config.seeds)
    tasks = tuple(tasks)

    @functools.cache  # each stage's DONE.json is read once, though several rows use it
    def result(seed, stage):
        return wd.result(f"seed{seed}/{stage}")

    experts = {s: {t: result(s, "experts")["scores"][t][t] for t in tasks} for s in seeds}
    rows: dict[str, MethodRow] = {}

    def add(key, label, block, budget, scores_fn):
        rows[key] = _method(label, block, budget, {s: scores_fn(s) for s in seeds},
                            experts, chance, tasks)

    for key in config.methods:
        stage = {"fused_only": "fusion"}.get(key, key)
        fn = (lambda s: experts[s]) if key == "single_task" else (
            lambda s, stage=stage: result(s, stage)["per_task"])
        add(key, labels[key], "main", budgets[key], fn)
    for key, (label, _) in ablations.items():
        add(key, label, "ablation", budgets["cpift"], lambda s, key=key: result(s, key)["per_task"])
    if config.merge_only.enabled:
        import cpift_jax.merges as merges_lib
        for name in config.merge_only.operators or merges_lib.available():
            key, label = f"merge_{name}", f"Merge only: {name}"
            budget = (f"probes {len(tasks)} x {config.train.steps_per_task} steps; "
                      "no SFT after merging")
            skipped = [r for r in (result(s, key) for s in seeds)
                       if r.get("status") == NOT_APPLICABLE]
            if skipped:
                rows[key] = MethodRow(label, "merge_only", budget, status=NOT_APPLICABLE,
                                      reason=str(skipped[0]["reason"]))
                continue
            add(key, label, "merge_only", budget, lambda s, key=key: result(s, key)["per_task"])

    floors = {t: float(chance[t]) for t in tasks}
    bootstrap = dict(resamples=resamples, confidence=confidence, seed=bootstrap_seed)
    rows, found = _with_statistics(config, wd, tasks, floors, rows, **bootstrap)
    # The config as JSON holds it (tuples as lists), so a saved and reloaded Results is equal.
    out = dict(config=json.loads(json.dumps(config.to_dict())),
               core_fraction=float(config.cpift.p), seeds=seeds, tasks=tasks, chance=floors,
               normalization=normalization, methods=rows, metrics=metrics, comparisons=found)
    if config.forgetting.enabled:
        per = {s: result(s, "forgetting") for s in seeds}
        pair = tuple(config.forgetting.pair)
        intervals = comparisons_lib.forgetting_intervals(wd, seeds, pair, list(forgetting_labels),
                                                         **bootstrap)
        out["forgetting"] = Forgetting(pair, {
            k: ForgettingRow(lab, stat([per[s][k]["drop_a"] for s in seeds]),
                             stat([per[s][k]["gain_b"] for s in seeds]),
                             intervals[k]["drop_a"], intervals[k]["gain_b"])
            for k, lab in forgetting_labels.items()})
    if wd.done(f"seed{seeds[0]}/clusters"):
        mats = [np.asarray(result(s, "clusters")["overlap"], float) for s in seeds]
        as_tuples = lambda m: tuple(tuple(float(v) for v in row) for row in m)  # noqa: E731
        out["overlap"] = Overlap(tasks, as_tuples(np.mean(mats, axis=0)),
                                 tuple(as_tuples(m) for m in mats))
        out["groups"] = tuple(tuple(tuple(g) for g in result(s, "clusters")["groups"])
                              for s in seeds)
        out["core_density"] = {t: CoreDensity(d["by_layer"], d["by_kind"])
                               for t, d in result(seeds[0], "cores")["density"].items()}
    return Results(**out)


def timings(wd) -> Timings:
    """Seconds of every completed stage of ``wd`` (from its DONE.json), in path order."""
    stages = {}
    for marker in sorted(wd.root.rglob("DONE.json")):
        stage = str(marker.parent.relative_to(wd.root))
        if ".partial-" in stage:
            continue
        stages[stage] = float(read_json(marker).get("seconds", 0.0))
    return Timings(float(sum(stages.values())), stages)
