"""The CPI-FT benchmark's results: ``Results`` (frozen dataclasses) built from a workdir's stages.

``collect`` reads the completed stages' ``DONE.json`` results and aggregates over seeds (mean and
population std, ``np.std``) into a ``Results``, with the paired comparisons the report states
(``comparison_pairs``; ``cpift_jax.benchmark.comparisons``) and each method's standard errors;
``Results.save`` writes ``results.json`` and ``Results.load`` reads it back, for
``cpift_jax.benchmark.report`` and ``plots``. The file is parsed in one place
(``Results.from_json``), which names the file and key of anything malformed and refuses a file of
another ``FORMAT``. Every setting the report shows (the core fraction ``p``
included) is a stored field, copied from the config when the results are collected.

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
        out = {"format": FORMAT, "config": self.config, "core_fraction": self.core_fraction,
               "seeds": list(self.seeds), "tasks": list(self.tasks), "chance": self.chance,
               "normalization": self.normalization,
               "methods": {k: _method_json(m) for k, m in self.methods.items()}}
        if self.forgetting is not None:
            out["forgetting"] = {"pair": list(self.forgetting.pair), "methods": {
                k: _forgetting_json(m) for k, m in self.forgetting.methods.items()}}
        if self.overlap is not None:
            out["overlap"] = {"tasks": list(self.overlap.tasks),
                              "matrix": [list(r) for r in self.overlap.matrix],
                              "per_seed": [[list(r) for r in m] for m in self.overlap.per_seed]}
        if self.groups is not None:
            out["groups"] = {"per_seed": [[list(g) for g in seed] for seed in self.groups]}
        if self.core_density is not None:
            out["core_density"] = {t: dataclasses.asdict(d) for t, d in self.core_density.items()}
        if self.timings is not None:
            out["timings"] = dataclasses.asdict(self.timings)
        if self.metrics is not None:
            out["metrics"] = dict(self.metrics)
        if self.comparisons is not None:
            c = self.comparisons
            out["comparisons"] = {
                "statistic": c.statistic, "resamples": c.resamples, "confidence": c.confidence,
                "examples": dict(c.examples),
                "pairs": [{"a": p.a, "b": p.b, "block": p.block, "interval": p.interval.to_json(),
                           "per_seed": list(p.per_seed)} for p in c.pairs]}
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = "results") -> Results:
        """Parses ``to_json``'s layout; ValueError naming ``source`` and the key of the first
        malformed value (or the format, for a file written by an older version)."""
        return _Parser(source).results(data)

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


def _stat_json(s: Stat) -> dict:
    out = {"mean": s.mean, "std": s.std}
    return out if s.se is None else {**out, "se": s.se}


def _method_json(m: MethodRow) -> dict:
    out = {"label": m.label, "block": m.block, "budget": m.budget, "status": m.status}
    if not m.applicable:
        return {**out, "reason": m.reason}
    return {**out, "per_task": {t: _stat_json(s) for t, s in m.per_task.items()},
            "avg_normalized": _stat_json(m.avg_normalized),
            "per_seed": [dataclasses.asdict(r) for r in m.per_seed]}


def _forgetting_json(m: ForgettingRow) -> dict:
    out = {"label": m.label, "drop_a": _stat_json(m.drop_a), "gain_b": _stat_json(m.gain_b)}
    for field in ("drop_a_interval", "gain_b_interval"):
        if getattr(m, field) is not None:
            out[field] = getattr(m, field).to_json()
    return out


# ------------------------------------------------------------------------------ reading it back

class _Parser:
    """Reads ``Results.to_json``'s layout, naming ``source`` and the key path in each error."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, problem: str):
        raise ValueError(f"{self.source}: {where} {problem}")

    def get(self, d: Any, key: str, where: str, kind: type | tuple, what: str) -> Any:
        if not isinstance(d, dict):
            self.fail(where, f"must be a dict, got {d!r:.80}")
        if key not in d:
            self.fail(where, f"has no {key!r} (keys: {', '.join(map(repr, d))})")
        value = d[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            self.fail(f"{where}[{key!r}]", f"must be {what}, got {value!r:.80}")
        return value

    def number(self, d: dict, key: str, where: str) -> float:
        return float(self.get(d, key, where, (int, float), "a number"))

    def text(self, d: dict, key: str, where: str) -> str:
        return self.get(d, key, where, str, "a string")

    def mapping(self, d: dict, key: str, where: str) -> dict:
        return self.get(d, key, where, dict, "a dict")

    def stat(self, d: dict, key: str, where: str) -> Stat:
        s, w = self.mapping(d, key, where), f"{where}[{key!r}]"
        return Stat(self.number(s, "mean", w), self.number(s, "std", w),
                    self.number(s, "se", w) if "se" in s else None)

    def interval(self, d: dict, key: str, where: str) -> Interval:
        i, w = self.mapping(d, key, where), f"{where}[{key!r}]"
        out = Interval(*(self.number(i, f, w) for f in ("estimate", "low", "high", "confidence")),
                       resamples=int(self.number(i, "resamples", w)))
        stored = self.text(i, "verdict", w)
        if stored != out.verdict:
            self.fail(f"{w}['verdict']", f"is {stored!r} but the interval [{out.low}, "
                      f"{out.high}] gives {out.verdict!r}")
        return out

    def comparisons(self, d: dict, w: str, tasks: tuple[str, ...], methods: dict) -> Comparisons:
        examples = self.mapping(d, "examples", w)
        if set(examples) != set(tasks):
            self.fail(f"{w}['examples']", f"must name every task of results['tasks'] {tasks} "
                      f"once, got {list(examples)}")
        rows = self.get(d, "pairs", w, list, "a list of paired comparisons")
        pairs = []
        known = set(methods) | {comparisons_lib.EXPERT}  # the experts are measured regardless
        for i, p in enumerate(rows):
            pw = f"{w}['pairs'][{i}]"
            a, b, block = (self.text(p, k, pw) for k in ("a", "b", "block"))
            for key, name in (("a", a), ("b", b)):
                if name not in known:
                    self.fail(f"{pw}[{key!r}]", f"is {name!r}, not a method of "
                              "results['methods']")
            if block not in BLOCKS:
                self.fail(f"{pw}['block']", f"is {block!r}; expected one of {BLOCKS}")
            per_seed = self.get(p, "per_seed", pw, list, "a list of numbers (one per seed)")
            values = self.numbers(dict(enumerate(per_seed)), f"{pw}['per_seed']")
            pairs.append(PairedComparison(a, b, block, self.interval(p, "interval", pw),
                                          tuple(values.values())))
        return Comparisons(
            self.text(d, "statistic", w), int(self.number(d, "resamples", w)),
            self.number(d, "confidence", w),
            {t: int(v) for t, v in self.numbers(examples, f"{w}['examples']").items()},
            tuple(pairs))

    def numbers(self, d: dict, where: str) -> dict[str, float]:
        return {k: self.number(d, k, where) for k in d}

    def per_task(self, d: dict, where: str, tasks: tuple[str, ...]) -> dict:
        per_task = self.mapping(d, "per_task", where)
        if set(per_task) != set(tasks):
            self.fail(f"{where}['per_task']", "is missing task(s) "
                      f"{[t for t in tasks if t not in per_task]} and has task(s) not in "
                      f"results['tasks'] {[t for t in per_task if t not in tasks]}")
        return per_task

    def method(self, d: Any, where: str, tasks: tuple[str, ...]) -> MethodRow:
        head = {k: self.text(d, k, where) for k in ("label", "block", "budget", "status")}
        if head["block"] not in BLOCKS:
            self.fail(f"{where}['block']", f"is {head['block']!r}; expected one of {BLOCKS}")
        if head["status"] == NOT_APPLICABLE:
            return MethodRow(**head, reason=self.text(d, "reason", where))
        if head["status"] != OK:
            self.fail(f"{where}['status']", f"is {head['status']!r}; expected {OK!r} or "
                      f"{NOT_APPLICABLE!r}")
        per_task = self.per_task(d, where, tasks)
        rows = self.get(d, "per_seed", where, list, "a list")
        per_seed = []
        for i, r in enumerate(rows):
            w = f"{where}['per_seed'][{i}]"
            per_seed.append(SeedScores(int(self.number(r, "seed", w)),
                                       self.numbers(self.per_task(r, w, tasks), f"{w}['per_task']"),
                                       self.number(r, "avg_normalized", w)))
        return MethodRow(**head, per_task={t: self.stat(per_task, t, f"{where}['per_task']")
                                           for t in tasks},
                         avg_normalized=self.stat(d, "avg_normalized", where),
                         per_seed=tuple(per_seed))

    def matrix(self, m: Any, n: int, where: str) -> tuple[tuple[float, ...], ...]:
        if not isinstance(m, list) or len(m) != n or any(
                not isinstance(r, list) or len(r) != n for r in m):
            self.fail(where, f"must be a square {n}x{n} matrix (one row and column per task of "
                      f"results['overlap']['tasks']), got {m!r:.80}")
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    self.fail(f"{where}[{i}][{j}]", f"must be a number, got {v!r:.80}")
        return tuple(tuple(float(v) for v in row) for row in m)

    def results(self, data: Any) -> Results:
        w = "results"
        if not isinstance(data, dict):
            self.fail(w, f"must be a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            self.fail(w, f"has format {data.get('format', '(none)')!r}, expected {FORMAT}: it "
                      "was written by another version of cpift_jax. Rerun the results stage: "
                      "delete <workdir>/results/DONE.json and run the pipeline again on the "
                      "same workdir (nothing else is recomputed)")
        tasks = tuple(self.get(data, "tasks", w, list, "a list of task names"))
        seeds = tuple(int(s) for s in self.get(data, "seeds", w, list, "a list of seeds"))
        methods = self.mapping(data, "methods", w)
        p = self.number(data, "core_fraction", w)
        if not 0 < p <= 1:
            self.fail(f"{w}['core_fraction']", f"must be in (0, 1], got {p}")
        out = dict(
            config=self.mapping(data, "config", w), core_fraction=p, seeds=seeds, tasks=tasks,
            chance=self.numbers(self.mapping(data, "chance", w), f"{w}['chance']"),
            normalization=self.text(data, "normalization", w),
            methods={k: self.method(m, f"{w}['methods'][{k!r}]", tasks)
                     for k, m in methods.items()})
        if "metrics" in data:
            metrics = self.mapping(data, "metrics", w)
            for t, label in metrics.items():
                if not isinstance(label, str):
                    self.fail(f"{w}['metrics'][{t!r}]", f"must be text, got {label!r:.80}")
            out["metrics"] = dict(metrics)
        if "forgetting" in data:
            f, fw = self.mapping(data, "forgetting", w), f"{w}['forgetting']"
            pair = self.get(f, "pair", fw, list, "[A task, B task]")
            if len(pair) != 2:
                self.fail(f"{fw}['pair']", f"must be [A task, B task], got {pair}")
            rows = {}
            for k, m in self.mapping(f, "methods", fw).items():
                mw = f"{fw}['methods'][{k!r}]"
                rows[k] = ForgettingRow(
                    self.text(m, "label", mw), self.stat(m, "drop_a", mw),
                    self.stat(m, "gain_b", mw),
                    *(self.interval(m, f, mw) if f in m else None
                      for f in ("drop_a_interval", "gain_b_interval")))
            out["forgetting"] = Forgetting(tuple(pair), rows)
        if "overlap" in data:
            o, ow = self.mapping(data, "overlap", w), f"{w}['overlap']"
            names = tuple(self.get(o, "tasks", ow, list, "a list of task names"))
            per_seed = self.get(o, "per_seed", ow, list, "a list of matrices")
            out["overlap"] = Overlap(
                names, self.matrix(o.get("matrix"), len(names), f"{ow}['matrix']"),
                tuple(self.matrix(m, len(names), f"{ow}['per_seed'][{i}]")
                      for i, m in enumerate(per_seed)))
        if "groups" in data:
            per_seed = self.get(self.mapping(data, "groups", w), "per_seed", f"{w}['groups']",
                                list, "a list (per seed) of lists of groups")
            out["groups"] = tuple(tuple(tuple(g) for g in seed) for seed in per_seed)
        if "core_density" in data:
            cw = f"{w}['core_density']"
            out["core_density"] = {
                t: CoreDensity(*(self.numbers(self.mapping(d, f, f"{cw}[{t!r}]"),
                                              f"{cw}[{t!r}][{f!r}]")
                                 for f in ("by_layer", "by_kind")))
                for t, d in self.mapping(data, "core_density", w).items()}
        if "timings" in data:
            t, tw = self.mapping(data, "timings", w), f"{w}['timings']"
            out["timings"] = Timings(self.number(t, "total_s", tw),
                                     self.numbers(self.mapping(t, "stages", tw), f"{tw}['stages']"))
        if "comparisons" in data:
            out["comparisons"] = self.comparisons(self.mapping(data, "comparisons", w),
                                                  f"{w}['comparisons']", tasks, out["methods"])
        return Results(**out)


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
