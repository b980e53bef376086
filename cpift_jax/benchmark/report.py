"""The results report of the CPI-FT benchmark: ``results.md`` and its plots from ``results.json``.

``render_markdown(results)`` is pure (``aggregate.Results`` -> str); ``write(workdir, results)``
also draws the plots (``cpift_jax.benchmark.plots``) under ``workdir/plots/`` and links them;
``rerender(workdir)`` does both from a workdir's ``results.json`` (``Results.load``) without
rerunning anything.

Sections, in order: the verdict (CPI-FT vs full multi-task SFT on the normalised average, worded
from the paired bootstrap interval of their difference: better than / worse than / not
distinguishable from), the main table shaped like Table 1 of arXiv 2508.21741 (tasks, then "Avg.
norm.", then the stated budget; the best method per column in bold, the single-task experts
excluded as they are the reference), the ablation and merge-only blocks with the same columns,
the paired comparisons (every pair of ``aggregate.comparison_pairs``: difference, interval,
verdict, per-seed values; forest plot), the forgetting table shaped like the paper's Table 2,
core overlap and groups per seed, core density, and the set-up (normalisation, seeds, chance
levels, timings, config). A section whose data is absent says "(not run)"; a method that does not
apply to the setting shows "n/a (<reason>)".

Score cells are ``mean ± standard error`` (over seeds and held-out examples, ``Stat.se``) when
every scored row has standard errors, else ``mean ± std over seeds`` (a results.json written
before standard errors existed); the note under each table says which.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from cpift_jax.benchmark import console
from cpift_jax.benchmark.aggregate import (BLOCKS, MIN_EXPERT_GAP, MethodRow, PairedComparison,
                                            Results, Stat)
from cpift_jax.benchmark.statistics import Interval

__all__ = ["NOT_RUN", "RESULTS_FILE", "REPORT_FILE", "render_markdown", "write", "rerender",
           "verdict"]

RESULTS_FILE = "results.json"
REPORT_FILE = "results.md"
NOT_RUN = "(not run)"
REFERENCE_METHOD = "single_task"  # never bold: every other method is normalised against it
_BLOCK_TITLES = {"main": "Main methods (shaped like Table 1 of the paper)",
                 "ablation": "Ablations", "merge_only": "Merge only (no training after merging)"}
_PLOT_TITLES = {"scores_main": "Per-task scores, main methods",
                "scores_ablation": "Per-task scores, ablations",
                "scores_merge_only": "Per-task scores, merge only",
                "overlap": "Core overlap (Jaccard)", "core_density": "Core density",
                "paired_differences": "Paired differences of the normalised average"}
_VERDICT_WORDS = {"better": "better than", "worse": "worse than",
                  "not distinguishable": "not distinguishable from"}
_REFERENCE_LABEL = "Single-task experts"  # a pair's label when the experts have no row
_RERUN = ("rerun the results stage: delete <workdir>/results/DONE.json and run the pipeline "
          "again on the same workdir (nothing else is recomputed)")
# What the paper reports on LLaMA-2-7B (arXiv 2508.21741, Tables 1-2): for the shape of the
# result only; the toy suite's numbers are not comparable.
_PAPER_TABLE1 = ("Paper, LLaMA-2-7B (avg. normalised, its own formula): full multi-task SFT "
                 "6.58, multi-stage random 6.70, multi-stage heuristic 6.75, CPI-FT 7.21.")
_PAPER_TABLE2 = ("Paper, LLaMA-2-7B: drop on A / gain on B = -24.5 / +13.4 (full SFT), "
                 "-16.2 / +12.6 (multi-stage), -5.7 / +12.2 (CPI-FT).")


# ----------------------------------------------------------------------------- formatting

def _fmt(stat: Stat | None, scale: float, decimals: int, sign: bool = False,
         spread: str = "std") -> str:
    """``mean ± std`` (or ``± se`` with ``spread="se"``) times ``scale``; "n/a" for a missing or
    NaN mean."""
    if stat is None or math.isnan(stat.mean):
        return "n/a"
    mean = f"{stat.mean * scale:{'+' if sign else ''}.{decimals}f}"
    width = getattr(stat, spread)
    if width is None or math.isnan(width):
        return mean
    return f"{mean} ± {width * scale:.{decimals}f}"


def _spread(results: Results) -> str:
    """``"se"`` when every scored row's per-task scores and average have standard errors."""
    stats = [s for m in results.methods.values() if m.applicable
             for s in [*m.per_task.values(), m.avg_normalized]]
    return "se" if stats and all(s.se is not None for s in stats) else "std"


def _signed(x: float, decimals: int = 2) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.{decimals}f}"


def _ci(interval: Interval, scale: float = 1.0, decimals: int = 2) -> str:
    """``[low, high]`` with signs; "undefined" when an end is NaN."""
    if interval.verdict == "undefined":
        return "undefined"
    return (f"[{_signed(interval.low * scale, decimals)}, "
            f"{_signed(interval.high * scale, decimals)}]")


def _label(results: Results, key: str) -> str:
    if key in results.methods:
        return results.methods[key].label
    return _REFERENCE_LABEL if key == REFERENCE_METHOD else key


def _mid_sentence(label: str) -> str:
    """``label`` inside a sentence: "Full multi-task SFT" -> "full multi-task SFT"; a label
    starting with an acronym ("CPI-FT", "TIES") is kept."""
    return label[0].lower() + label[1:] if label[1:2].islower() else label


def _sample_size(results: Results) -> str:
    """"5 seeds x 500 examples" (a range when the tasks' test sets differ in size)."""
    seeds = len(results.seeds)
    counts = sorted(set(results.comparisons.examples.values())) if results.comparisons else []
    examples = (f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
                if counts else "?")
    per_task = " per task" if len(results.tasks) > 1 else ""
    return f"{seeds} seed{'s' if seeds != 1 else ''} x {examples} examples{per_task}"

def _rounded_mean(stat: Stat | None, scale: float, decimals: int) -> float | None:
    if stat is None or math.isnan(stat.mean):
        return None
    return round(stat.mean * scale, decimals)


def _bold_rows(stats: dict[str, Stat | None], scale: float, decimals: int) -> set[str]:
    """Rows holding the column maximum *as displayed* (ties all bold); none if < 2 candidates."""
    shown = {k: _rounded_mean(s, scale, decimals) for k, s in stats.items()}
    shown = {k: v for k, v in shown.items() if v is not None}
    if len(shown) < 2:
        return set()
    best = max(shown.values())
    return {k for k, v in shown.items() if v == best}


def _table(header: list[str], rows: list[list[str]], text_columns: tuple[int, ...] = (0,)) -> str:
    """A markdown table; numeric columns right-aligned, ``text_columns`` left-aligned."""
    align = [":--" if i in text_columns or i - len(header) in text_columns else "--:"
             for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


# ----------------------------------------------------------------------------- sections

def _methods_table(results: Results, block: str) -> str:
    keys = results.methods_in(block)
    if not keys:
        return NOT_RUN
    methods, tasks = results.methods, results.tasks
    scored = [k for k in keys if methods[k].applicable]
    candidates = [k for k in scored if k != REFERENCE_METHOD]
    columns = [(t, lambda m, t=t: m.per_task[t], 100.0, 1) for t in tasks]
    columns.append(("Avg. norm.", lambda m: m.avg_normalized, 1.0, 2))
    spread = _spread(results)
    # A method that does not apply: its reason in the first score column, dashes after it.
    cells = {k: [f"n/a ({methods[k].reason})"] + ["–"] * (len(columns) - 1)
             for k in keys if k not in scored}
    cells.update({k: [] for k in scored})
    for _, get, scale, decimals in columns:
        bold = _bold_rows({k: get(methods[k]) for k in candidates}, scale, decimals)
        for k in scored:
            cell = _fmt(get(methods[k]), scale, decimals, spread=spread)
            cells[k].append(f"**{cell}**" if k in bold else cell)
    rows = [[methods[k].label] + cells[k] + [methods[k].budget] for k in keys]
    header = ["Method"] + [name for name, *_ in columns] + ["Budget"]
    metrics = results.metrics or {}
    measured = ("exact match" if not metrics else
                "; ".join(f"{t}: {metrics[t]}" for t in results.tasks if t in metrics))
    n_seeds = f"{len(results.seeds)} seed{'s' if len(results.seeds) != 1 else ''}"
    spread_note = (f"mean over {n_seeds} ± standard error (over seeds and "
                   "held-out examples: two-level bootstrap)" if spread == "se" else
                   f"mean ± std over {n_seeds}")
    note = (f"Task scores in % ({measured}), {spread_note}; Avg. "
            "norm.: see Set-up. Bold: best per column" +
            (f" ({methods[REFERENCE_METHOD].label} excluded: it is the reference)."
             if REFERENCE_METHOD in keys else "."))
    return _table(header, rows, text_columns=(0, -1)) + "\n\n" + note


def verdict(results: Results) -> str:
    """One line: CPI-FT vs full multi-task SFT on the normalised average, worded from the
    paired bootstrap interval of the difference (``Results.comparisons``)."""
    methods = results.methods
    if "cpift" not in methods or "multitask_sft" not in methods:
        return f"{NOT_RUN}: needs both 'cpift' and 'multitask_sft' in methods"
    c, m = methods["cpift"], methods["multitask_sft"]
    pair = results.comparisons.find("cpift", "multitask_sft") if results.comparisons else None
    if pair is None:
        return ("no verdict: this results.json has no paired comparison of 'cpift' and "
                f"'multitask_sft' (written before paired statistics existed); {_RERUN}")
    interval = pair.interval
    if pair.verdict == "undefined":
        return (f"no verdict: the difference of the normalised averages of 'cpift' and "
                f"'multitask_sft' or its interval is undefined (NaN: on some seed or bootstrap "
                f"replicate no task's expert beat its floor (chance or the base model) by "
                f"{MIN_EXPERT_GAP}; see Set-up)")
    line = (f"{c.label} is {_VERDICT_WORDS[pair.verdict]} {_mid_sentence(m.label)} on the "
            f"normalised average: difference {_signed(interval.estimate)} "
            f"[{interval.confidence:.0%} CI {_signed(interval.low)}, {_signed(interval.high)}], "
            f"{_sample_size(results)}")
    wins = _seed_wins(c, m)
    if wins is not None:
        line += f"; {c.label} is higher on {wins[0]} of {wins[1]} seeds"
    return line + "."


def _seed_wins(a: MethodRow, b: MethodRow) -> tuple[int, int] | None:
    """How many seeds ``a`` beats ``b`` on (avg_normalized), over the seeds both report."""
    sa = {r.seed: r.avg_normalized for r in a.per_seed}
    sb = {r.seed: r.avg_normalized for r in b.per_seed}
    common = [s for s in sa if s in sb and not math.isnan(sa[s]) and not math.isnan(sb[s])]
    if not common:
        return None
    return sum(sa[s] > sb[s] for s in common), len(common)


def _paired_comparisons(results: Results) -> str:
    found = results.comparisons
    if found is None:
        return f"{NOT_RUN}: this results.json predates paired statistics; {_RERUN}"
    if not found.pairs:
        return f"{NOT_RUN}: no pair to compare (needs CPI-FT or a merge-only operator)"

    def row(p: PairedComparison) -> list[str]:
        return [f"{_label(results, p.a)} − {_label(results, p.b)}",
                _signed(p.interval.estimate), _ci(p.interval), p.verdict,
                ", ".join(_signed(v) for v in p.per_seed)]

    confidence = f"{found.pairs[0].interval.confidence:.0%}"
    table = _table(["Comparison (A − B)", "Difference", f"{confidence} CI", "Verdict",
                    "Per seed"], [row(p) for p in found.pairs], text_columns=(0, 3, 4))
    return (table + "\n\n" + f"Difference: {found.statistic}. {found.resamples} bootstrap "
            f"resamples; {_sample_size(results)}; per seed: A − B on each seed "
            f"({', '.join(map(str, results.seeds))}).")


def _forgetting(results: Results) -> str:
    forgetting = results.forgetting
    if forgetting is None or not forgetting.methods:
        return NOT_RUN
    a, b = forgetting.pair
    methods = forgetting.methods
    with_ci = all(m.drop_a_interval is not None and m.gain_b_interval is not None
                  for m in methods.values())
    rows = {k: [m.label] for k, m in methods.items()}
    for field in ("drop_a", "gain_b"):
        # Largest is best in both columns: a drop nearer zero, a larger gain.
        bold = _bold_rows({k: getattr(m, field) for k, m in methods.items()}, 100.0, 1)
        for k, m in methods.items():
            if with_ci:
                cell = (f"{_fmt(Stat(getattr(m, field).mean, math.nan), 100.0, 1, sign=True)} "
                        f"{_ci(getattr(m, field + '_interval'), 100.0, 1)}")
            else:
                cell = _fmt(getattr(m, field), 100.0, 1, sign=True)
            rows[k].append(f"**{cell}**" if k in bold else cell)
    table = _table(["Method", f"Drop on A ({a})", f"Gain on B ({b})"], list(rows.values()))
    if with_ci:
        interval = next(iter(methods.values())).drop_a_interval
        spread = (f"mean over seeds [{interval.confidence:.0%} CI: paired two-level bootstrap "
                  f"over seeds and held-out examples, {interval.resamples} resamples]")
    else:
        spread = "mean ± std over seeds"
    return (f"Sequential training A → B with A = {a}, B = {b}.\n\n" + table + "\n\n"
            f"Percentage points, {spread}. Drop on A: score on A after A → B minus "
            "score on A after training on A alone (negative = forgotten). Gain on B: score on B "
            "after A → B minus the base model's score on B. Bold: best per column.\n\n"
            + _PAPER_TABLE2)


def _overlap_and_groups(results: Results) -> str:
    parts = []
    overlap = results.overlap
    if overlap is not None:
        tasks, matrix = overlap.tasks, overlap.matrix
        n = len(overlap.per_seed)
        rows = [[t] + [f"{v:.3f}" for v in row] for t, row in zip(tasks, matrix)]
        parts.append(f"Jaccard overlap |Ci ∩ Cj| / |Ci ∪ Cj| of the core regions, mean over {n} "
                     "seeds:\n\n" + _table(["Task"] + list(tasks), rows))
    else:
        parts.append(f"Overlap matrix: {NOT_RUN}")
    per_seed = results.groups
    if per_seed:
        seeds = results.seeds
        names = seeds if len(seeds) == len(per_seed) else [f"run {i}" for i in range(len(per_seed))]
        lines = [f"- seed {s}: " + " → ".join("{" + ", ".join(map(str, g)) + "}" for g in groups)
                 + f" ({len(groups)} group{'s' if len(groups) != 1 else ''})"
                 for s, groups in zip(names, per_seed)]
        parts.append("Groups (connected components at overlap >= tau), in stage order:\n\n"
                     + "\n".join(lines))
    else:
        parts.append(f"Groups: {NOT_RUN}")
    return "\n\n".join(parts)


def _density_table(density: dict, field: str) -> str:
    tasks = list(density)
    by = {t: getattr(density[t], field) for t in tasks}
    groups = list(dict.fromkeys(g for t in tasks for g in by[t]))
    rows = [[t] + [f"{by[t][g] * 100:.2f}" if g in by[t] else "–" for g in groups]
            for t in tasks]
    return _table(["Task"] + [str(g) for g in groups], rows)


def _core_density(results: Results) -> str:
    density = results.core_density
    if not density:
        return NOT_RUN
    expected = ("the expected density under a uniform spread is the core fraction p = "
                f"{_pct(results.core_fraction)}")
    return (f"Share of each group's entries that are core, in % (seed 0); {expected}.\n\n"
            "By layer:\n\n" + _density_table(density, "by_layer") +
            "\n\nBy parameter kind:\n\n" + _density_table(density, "by_kind"))


def _setup(results: Results) -> str:
    lines = [f"- Normalisation: {results.normalization}"]
    seeds = results.seeds
    lines.append(f"- Seeds: {', '.join(map(str, seeds))} ({len(seeds)})" if seeds
                 else f"- Seeds: {NOT_RUN}")
    chance = results.chance
    lines.append("- Normalisation floor per task (chance level, or the base model's score on "
                 "real tasks): "
                 + (", ".join(f"{t} {_pct(v)}" for t, v in chance.items()) if chance else NOT_RUN))
    timings = results.timings
    if timings is not None:
        lines.append(f"- Total time: {console.seconds(timings.total_s)}")
        stages = timings.stages
        if stages:
            lines.append("\n" + _table(["Stage", "Time"],
                                       [[k, console.seconds(v)] for k, v in stages.items()]))
    else:
        lines.append(f"- Timings: {NOT_RUN}")
    lines.append("\n<details><summary>Config</summary>\n\n```json\n"
                 + json.dumps(results.config, indent=2, sort_keys=True)
                 + "\n```\n\n</details>")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- document

def render_markdown(results: Results, plots: dict[str, str] | None = None) -> str:
    """The whole report as markdown. ``plots`` maps plot names (``scores_main``, ``overlap``,
    ``core_density``, ``paired_differences``, ...) to paths relative to the markdown file;
    absent plots are not linked."""
    plots = plots or {}

    def image(name: str) -> str:
        return f"\n\n![{_PLOT_TITLES.get(name, name)}]({plots[name]})" if name in plots else ""

    tasks = results.tasks
    out = ["# CPI-FT benchmark: results", "",
           f"Tasks: {', '.join(tasks) if tasks else NOT_RUN}. "
           f"Seeds: {', '.join(map(str, results.seeds)) or NOT_RUN}.", "",
           "## Verdict", "", verdict(results)]
    for block in BLOCKS:
        body = _methods_table(results, block)
        if block == "main" and body != NOT_RUN:
            body += "\n\n" + _PAPER_TABLE1
        out += ["", f"## {_BLOCK_TITLES[block]}", "", body + image(f"scores_{block}")]
    out += ["", "## Paired comparisons", "",
            _paired_comparisons(results) + image("paired_differences")]
    out += ["", "## Forgetting (shaped like Table 2 of the paper)", "", _forgetting(results),
            "", "## Core overlap and groups", "", _overlap_and_groups(results) + image("overlap"),
            "", "## Core density", "", _core_density(results) + image("core_density"),
            "", "## Set-up", "", _setup(results), ""]
    return "\n".join(out)


def _write_text(path: Path, text: str) -> None:
    """Atomic: a temporary file in the same directory, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(workdir: str | os.PathLike, results: Results) -> list[str]:
    """Writes ``results.md`` and ``plots/*.png`` into ``workdir``; returns the paths written."""
    from cpift_jax.benchmark import plots as plots_lib  # matplotlib only when drawing

    root = Path(workdir)
    (root / "plots").mkdir(parents=True, exist_ok=True)
    drawn: dict[str, Path] = {}
    for block in BLOCKS:
        if any(results.methods[k].applicable for k in results.methods_in(block)):
            drawn[f"scores_{block}"] = root / "plots" / f"scores_{block}.png"
            plots_lib.scores_by_method(results, drawn[f"scores_{block}"], block=block)
    if results.overlap is not None:
        drawn["overlap"] = root / "plots" / "overlap.png"
        plots_lib.overlap_heatmap(results, drawn["overlap"])
    if results.core_density:
        drawn["core_density"] = root / "plots" / "core_density.png"
        plots_lib.core_density(results, drawn["core_density"])
    if results.comparisons is not None and results.comparisons.pairs:
        drawn["paired_differences"] = root / "plots" / "paired_differences.png"
        plots_lib.paired_differences(results, drawn["paired_differences"])
    links = {name: path.relative_to(root).as_posix() for name, path in drawn.items()}
    markdown = render_markdown(results, links)
    _write_text(root / REPORT_FILE, markdown)
    return [str(root / REPORT_FILE)] + [str(p) for p in drawn.values()]


def rerender(workdir: str | os.PathLike) -> list[str]:
    """``write`` from the workdir's own ``results.json`` (nothing is rerun)."""
    path = Path(workdir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {RESULTS_FILE} in workdir {Path(workdir).absolute()}; "
                                "run the pipeline first (python -m experiments.cpift)")
    return write(workdir, Results.load(path))
