"""The regime map: where CPI-FT, mixing, or merging alone wins, cell by cell of a sweep grid.

``analyse(cells)`` turns the cells of ``cpift_jax.benchmark.sweep.grid`` into rows, one per cell
and comparison; ``write(root, rows, axes)`` renders them as ``root/regime_map.md`` and
``root/regime_map.json`` (cell, knob values, estimate, interval, verdict) and one heat map per
comparison, ``root/plots/<comparison>.png``.

Comparisons (``COMPARISONS``), each a paired difference ``a - b`` of avg-normalised scores with
a two-level bootstrap interval over seeds and held-out examples (``comparisons.compare``,
``cpift_jax.benchmark.statistics``):

* ``cpift_minus_multitask_sft``: CPI-FT minus full multi-task SFT (does isolation beat mixing?)
* ``cpift_minus_best_merge``: CPI-FT minus the cell's best merge-only operator, the one with
  the highest mean avg-normalised score in that cell (does the SFT after merging pay?). It is
  picked on the same data it is compared on, so both merge comparisons lean in merging's
  favour (the interval does not count the choice among the operators)
* ``best_merge_minus_experts``: that operator minus the single-task experts (does merging alone
  keep the experts' skills?)

and, from the forgetting pair A -> B (``cpift_jax.benchmark.forgetting``), paired differences
of mean per-example scores on A's held-out examples with the same two-level bootstrap over seeds
and examples (``comparisons.forgetting_intervals``; with one seed, over examples only; all of a
cell's forgetting rows share one draw of seeds and examples):

* ``forgetting_drop_<method>``: the drop on A, acc_A(after A -> B) - acc_A(after A), per method
  (negative = forgotten; verdict ``worse`` = a drop that excludes zero)
* ``forgetting_cpift_minus_full_sft``: CPI-FT's drop minus full SFT's (positive = CPI-FT
  forgets less)

A forgetting stage written without per-example values (an older cpift_jax) gives the same rows
from its stored drops, bootstrapped over seeds only (no interval with one seed: ``undefined``);
the row's ``note`` says so.

Verdicts: ``better`` (the interval is above 0), ``worse`` (below 0), ``not distinguishable``,
``undefined`` (no interval: one seed and no per-example forgetting values, or an expert at
chance), ``not run`` (the cell lacks a method; its ``note`` says which). Heat maps: knob 1 on x,
knob 2 on y (one row for a one-knob sweep), colour = estimate on a diverging scale centred on 0
(blue: a > b, red: a < b), the estimate written in each cell and ``*`` where the interval
excludes zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from cpift_jax import distributed
from cpift_jax.benchmark import aggregate, comparisons, statistics
from cpift_jax.benchmark import forgetting as forgetting_lib
from cpift_jax.training.checkpoints import write_json

__all__ = ["COMPARISONS", "best_merge", "analyse", "analyse_cell", "format_markdown",
           "grid_of", "heat_map", "write"]

COMPARISONS = {
    "cpift_minus_multitask_sft": "CPI-FT minus full multi-task SFT",
    "cpift_minus_best_merge": "CPI-FT minus the best merge-only operator",
    "best_merge_minus_experts": "Best merge-only operator minus the single-task experts",
    **{f"forgetting_drop_{k}": f"Forgetting: drop on A, {label}"
       for k, label in forgetting_lib.LABELS.items()},
    "forgetting_cpift_minus_full_sft": "Forgetting: CPI-FT's drop on A minus full SFT's",
}
EXCLUDES_ZERO = ("better", "worse")
NOT_RUN = "not run"
FORMAT = 1  # regime_map.json layout


# ------------------------------------------------------------------------------- analysis

def best_merge(results: aggregate.Results) -> str | None:
    """Key of the applicable merge-only method with the highest mean avg-normalised score
    (None when the cell ran none, or none has a score)."""
    scored = {k: results.methods[k].avg_normalized.mean for k in results.methods_in("merge_only")
              if results.methods[k].applicable}
    scored = {k: v for k, v in scored.items() if math.isfinite(v)}
    return max(scored, key=scored.get) if scored else None


def _row(cell, comparison: str, a: str, b: str | None, interval: statistics.Interval | None,
         note: str = "") -> dict:
    row = {"cell": cell.name, "knobs": dict(cell.knobs), "comparison": comparison, "a": a,
           "b": b, "estimate": math.nan, "low": math.nan, "high": math.nan,
           "confidence": math.nan, "resamples": 0, "verdict": NOT_RUN, "note": note}
    if interval is not None:
        row.update(interval.to_json())
    return row


def _forgetting_rows(cell, wd, *, resamples, confidence, seed) -> list[dict]:
    """Drops on A per method and CPI-FT minus full SFT: over seeds and examples from the stored
    per-example values, else (an older stage) over seeds only from the stored drops."""
    keys = list(forgetting_lib.LABELS)
    names = [f"forgetting_drop_{k}" for k in keys] + ["forgetting_cpift_minus_full_sft"]
    labels = [(f"forgetting:{k}", None) for k in keys] + [("forgetting:cpift",
                                                          "forgetting:full_sft")]
    if not cell.config.forgetting.enabled:
        return [_row(cell, n, a, b, None, "forgetting not enabled in this cell")
                for n, (a, b) in zip(names, labels)]
    seeds = [int(s) for s in cell.config.seeds]
    results = {s: wd.result(f"seed{s}/forgetting") for s in seeds}
    bootstrap = dict(resamples=resamples, confidence=confidence, seed=seed)
    if all(results[s].get(k, {}).get("per_example") for s in seeds for k in keys):
        intervals = _forgetting_per_example(wd, results, tuple(cell.config.forgetting.pair),
                                            keys, names, **bootstrap)
        note = "one seed: interval over examples only" if len(seeds) < 2 else ""
    else:
        intervals, note = _forgetting_per_seed(results, keys, names, **bootstrap)
    return [_row(cell, n, a, b, intervals[n], note) for n, (a, b) in zip(names, labels)]


def _forgetting_per_example(wd, results, pair, keys, names, *, resamples, confidence,
                            seed) -> dict[str, statistics.Interval]:
    """``names`` -> interval, over seeds and A's examples (``comparisons.forgetting_intervals``,
    the difference of drops paired on the same examples and draws)."""
    found = comparisons.forgetting_intervals(wd, list(results), pair, keys, resamples=resamples,
                                             confidence=confidence, seed=seed,
                                             difference=("cpift", "full_sft"))
    out = {f"forgetting_drop_{k}": found[k]["drop_a"] for k in keys}
    out[names[-1]] = found["cpift_minus_full_sft"]["drop_a"]
    return out


def _forgetting_per_seed(results, keys, names, *, resamples, confidence,
                         seed) -> tuple[dict[str, statistics.Interval], str]:
    """``(names -> interval, note)`` from the stored drops alone, bootstrapped over seeds."""
    seeds = list(results)
    drops = np.array([[results[s][k]["drop_a"] for k in keys] for s in seeds], np.float64)
    samples = {"drop": drops[:, None, :]}  # [seeds, 1 "example", methods]
    i, j = keys.index("cpift"), keys.index("full_sft")
    # Statistics take [..., seeds, methods] means (leading axes: bootstrap replicates).
    statistics_ = [(lambda means, m=m: means["drop"][..., m].mean(axis=-1))
                   for m in range(len(keys))] + [statistics.difference_of_means(i, j)]
    if len(seeds) < 2:  # one seed: the estimates, but no interval to read a verdict from
        return {n: statistics.Interval(float(fn({"drop": drops})), math.nan, math.nan,
                                       confidence, resamples)
                for n, fn in zip(names, statistics_)}, "one seed: no interval"
    intervals = statistics.bootstrap_many(samples, dict(zip(names, statistics_)),
                                          resamples=resamples, confidence=confidence, seed=seed)
    return intervals, f"interval over {len(seeds)} seeds only (no per-example forgetting scores)"


def analyse_cell(cell, *, resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> list[dict]:
    """The rows of one ``sweep.Cell`` (one per name in ``COMPARISONS``, module doc)."""
    from cpift_jax.benchmark.sweep import IGNORED_KEYS
    from cpift_jax.benchmark.workdir import Workdir

    results = cell.results
    wd = Workdir(cell.workdir, cell.config.to_dict(), ignore_keys=IGNORED_KEYS)
    merge = best_merge(results)
    wanted = {"cpift_minus_multitask_sft": ("cpift", "multitask_sft"),
              "cpift_minus_best_merge": ("cpift", merge),
              "best_merge_minus_experts": (merge, "single_task")}
    ran = set(results.methods)
    pairs = {name: ab for name, ab in wanted.items() if set(ab) <= ran}
    intervals = comparisons.compare(
        wd, cell.config, results.tasks, results.chance, list(dict.fromkeys(pairs.values())),
        resamples=resamples, confidence=confidence, seed=seed) if pairs else {}
    rows = []
    for name, (a, b) in wanted.items():
        if name in pairs:
            rows.append(_row(cell, name, a, b, intervals[(a, b)]))
        else:
            missing = "no applicable merge-only operator" if None in (a, b) else \
                f"method(s) {sorted({a, b} - ran)} not run"
            rows.append(_row(cell, name, a, b, None, missing))
    return rows + _forgetting_rows(cell, wd, resamples=resamples, confidence=confidence,
                                   seed=seed)


def analyse(cells: Sequence, **kw) -> list[dict]:
    """``analyse_cell`` over every cell, in grid order."""
    return [row for cell in cells for row in analyse_cell(cell, **kw)]


# ------------------------------------------------------------------------------- the table

def _number(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:+.3f}"


def format_markdown(rows: Sequence[Mapping], axes: Sequence[tuple[str, Sequence]]) -> str:
    """One section per comparison, one line per cell: knob values, estimate, interval,
    verdict (``*``: the interval excludes zero)."""
    knobs = [k for k, _ in axes]
    lines = ["# Regime map", "",
             "Paired differences a - b of avg-normalised scores (forgetting: of drops on A), "
             "with bootstrap percentile intervals (cpift_jax/benchmark/regime_map.py); "
             "`*` marks an interval that excludes zero.", ""]
    for name, title in COMPARISONS.items():
        chosen = [r for r in rows if r["comparison"] == name]
        if not chosen:
            continue
        lines += [f"## {title} (`{name}`)", "",
                  "| cell | " + " | ".join(knobs) + " | a | b | estimate | CI | verdict |",
                  "|---|" + "--:|" * len(knobs) + "---|---|--:|--:|---|"]
        for r in chosen:
            level = f"{r['confidence'] * 100:g}%: " if math.isfinite(r["confidence"]) else ""
            ci = (f"{level}[{_number(r['low'])}, {_number(r['high'])}]"
                  if math.isfinite(r["low"]) else "n/a")
            star = " *" if r["verdict"] in EXCLUDES_ZERO else ""
            verdict = r["verdict"] + (f" ({r['note']})" if r["note"] else "")
            lines.append(f"| {r['cell']} | " + " | ".join(str(r["knobs"][k]) for k in knobs)
                         + f" | {r['a']} | {r['b'] or ''} | {_number(r['estimate'])}{star} | "
                           f"{ci} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------------------ heat maps

def grid_of(rows: Sequence[Mapping], axes: Sequence[tuple[str, Sequence]],
            comparison: str) -> tuple[np.ndarray, list[list[str]]]:
    """``(estimate [len(values2), len(values1)], cell labels)`` of one comparison: row y =
    knob 2's y-th value, column x = knob 1's x-th value (one row for one knob). A label is the
    estimate, ``*`` when its interval excludes zero and the merge operator's name when the
    comparison involves the best merge; NaN and ``n/a`` where the cell has no estimate."""
    (knob_x, xs), (knob_y, ys) = (axes[0], axes[1]) if len(axes) == 2 else (axes[0], ("", [""]))
    index_x = {str(v): i for i, v in enumerate(xs)}
    index_y = {str(v): i for i, v in enumerate(ys)}
    estimate = np.full((len(ys), len(xs)), np.nan)
    labels = [["n/a"] * len(xs) for _ in ys]
    for r in rows:
        if r["comparison"] != comparison:
            continue
        x = index_x[str(r["knobs"][knob_x])]
        y = index_y[str(r["knobs"][knob_y])] if knob_y else 0
        estimate[y, x] = r["estimate"]
        if math.isfinite(r["estimate"]):
            text = f"{r['estimate']:+.2f}" + ("*" if r["verdict"] in EXCLUDES_ZERO else "")
            merge = next((m for m in (r["a"], r["b"]) if m and m.startswith("merge_")), None)
            labels[y][x] = text + (f"\n{merge[len('merge_'):]}" if merge else "")
    return estimate, labels


def heat_map(rows: Sequence[Mapping], axes: Sequence[tuple[str, Sequence]], comparison: str,
             path) -> str:
    """PNG of one comparison over the grid (module doc; values from ``grid_of``); cells
    without an estimate are grey."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    (knob_x, xs), (knob_y, ys) = (axes[0], axes[1]) if len(axes) == 2 else (axes[0], ("", [""]))
    estimate, labels = grid_of(rows, axes, comparison)
    finite = np.abs(estimate[np.isfinite(estimate)])
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0

    fig = Figure(figsize=(1.3 * len(xs) + 3.0, 0.9 * len(ys) + 2.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.set_facecolor("0.85")  # cells with no estimate (NaN) show the background
    image = ax.imshow(np.ma.masked_invalid(estimate), cmap="RdBu", vmin=-limit, vmax=limit,
                      origin="lower", aspect="auto")
    for y in range(len(ys)):
        for x in range(len(xs)):
            dark = math.isfinite(estimate[y, x]) and abs(estimate[y, x]) > 0.6 * limit
            ax.text(x, y, labels[y][x], ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    ax.set_xticks(range(len(xs)), [str(v) for v in xs])
    ax.set_yticks(range(len(ys)), [str(v) for v in ys])
    ax.set_xlabel(knob_x)
    ax.set_ylabel(knob_y)
    ax.set_title(f"{COMPARISONS.get(comparison, comparison)}\n* interval excludes zero",
                 fontsize=9)
    single = comparison.startswith("forgetting_drop_")
    fig.colorbar(image, ax=ax, label="drop on A" if single else "estimate (a - b)")
    FigureCanvasAgg(fig)  # the Agg canvas: never an interactive backend
    fig.savefig(path, format="png")
    return str(path)


def write(root, rows: Sequence[Mapping], axes: Sequence[tuple[str, Sequence]]) -> dict:
    """Writes ``root/regime_map.md``, ``root/regime_map.json`` and a heat map per comparison
    that has rows (``root/plots/<comparison>.png``); process 0 only. Returns the paths."""
    root = Path(root)
    md, js = root / "regime_map.md", root / "regime_map.json"
    plots = {c: root / "plots" / f"{c}.png" for c in COMPARISONS
             if any(r["comparison"] == c for r in rows)}
    if distributed.is_primary():
        write_json(js, _json_safe({"format": FORMAT, "axes": [[k, list(v)] for k, v in axes],
                                   "comparisons": COMPARISONS, "rows": list(rows)}),
                   sort_keys=False)
        md.write_text(format_markdown(rows, axes) + "\n")
        (root / "plots").mkdir(parents=True, exist_ok=True)
        for comparison, path in plots.items():
            heat_map(rows, axes, comparison, path)
    return {"markdown": md, "json": js, "plots": plots}
