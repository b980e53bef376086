"""The layout of ``results.json``: ``to_json`` writes a ``Results`` as plain JSON values and
``from_json`` reads them back strictly. The reader checks every key it uses and raises a
ValueError naming the source file and the key path of the first malformed value (a missing key,
a wrong type, a verdict that disagrees with its interval, a comparison naming an unknown method,
a per-task table that does not match ``results['tasks']``), and refuses a file whose ``format``
is not ``aggregate.FORMAT``. The optional sections (forgetting, overlap, groups, core density,
timings, metrics, comparisons) are written only when present and read only when there, so a file
written before they existed still loads. ``Results.to_json``, ``from_json``, ``save`` and
``load`` in ``cpift_jax.benchmark.aggregate`` call these; use those.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cpift_jax.benchmark import comparisons as comparisons_lib
from cpift_jax.benchmark.aggregate import (
    BLOCKS, FORMAT, NOT_APPLICABLE, OK, Comparisons, CoreDensity, Forgetting, ForgettingRow,
    MethodRow, Overlap, PairedComparison, Results, SeedScores, Stat, Timings)
from cpift_jax.benchmark.statistics import Interval

__all__ = ["to_json", "from_json"]


# ------------------------------------------------------------------------------ writing it

def to_json(results: Results) -> dict:
    """``results`` in the layout of ``results.json`` (module doc)."""
    out = {"format": FORMAT, "config": results.config, "core_fraction": results.core_fraction,
           "seeds": list(results.seeds), "tasks": list(results.tasks), "chance": results.chance,
           "normalization": results.normalization,
           "methods": {k: _method_json(m) for k, m in results.methods.items()}}
    if results.forgetting is not None:
        out["forgetting"] = {"pair": list(results.forgetting.pair), "methods": {
            k: _forgetting_json(m) for k, m in results.forgetting.methods.items()}}
    if results.overlap is not None:
        out["overlap"] = {"tasks": list(results.overlap.tasks),
                          "matrix": [list(r) for r in results.overlap.matrix],
                          "per_seed": [[list(r) for r in m] for m in results.overlap.per_seed]}
    if results.groups is not None:
        out["groups"] = {"per_seed": [[list(g) for g in seed] for seed in results.groups]}
    if results.core_density is not None:
        out["core_density"] = {t: dataclasses.asdict(d) for t, d in results.core_density.items()}
    if results.timings is not None:
        out["timings"] = dataclasses.asdict(results.timings)
    if results.metrics is not None:
        out["metrics"] = dict(results.metrics)
    if results.comparisons is not None:
        c = results.comparisons
        out["comparisons"] = {
            "statistic": c.statistic, "resamples": c.resamples, "confidence": c.confidence,
            "examples": dict(c.examples),
            "pairs": [{"a": p.a, "b": p.b, "block": p.block, "interval": p.interval.to_json(),
                       "per_seed": list(p.per_seed)} for p in c.pairs]}
    return out


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

def from_json(data: Any, source: str = "results") -> Results:
    """Parses ``to_json``'s layout; ValueError naming ``source`` and the key of the first
    malformed value (or the format, for a file written by an older version)."""
    return _Parser(source).results(data)


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
