"""PNG plots of the benchmark's results (``cpift_jax.benchmark.aggregate.Results``).

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas: no pyplot
state, no display, safe to call from a headless job. Each function raises ``ValueError`` naming
the section it draws when that section is absent (not run).

- ``scores_by_method``: per-task exact-match scores by method (grouped bars, std over seeds as
  error bars, chance level per task as a dashed tick), plus the normalised average per method.
- ``overlap_heatmap``: the Jaccard matrix of the tasks' core regions, values annotated.
- ``core_density``: per task, the share of core entries by layer and by parameter kind; a
  uniform spread would put every bar at the core fraction p, drawn as a reference line.
- ``paired_differences``: a forest plot, one row per paired comparison (``Results.comparisons``):
  the difference of the normalised average as a dot, its bootstrap interval as a bar, coloured
  by the verdict, with the zero line (an undefined interval: the dot only).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cpift_jax.benchmark.aggregate import Results, Stat

__all__ = ["scores_by_method", "overlap_heatmap", "core_density", "paired_differences"]

_DPI = 100


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw):
    from matplotlib.figure import Figure  # imported here: the report text needs no matplotlib

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _save(fig, path: str | os.PathLike) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attach the Agg canvas explicitly: never an interactive backend
    fig.savefig(path, format="png")
    return str(path)


def _require(results: Results, section: str) -> None:
    if not getattr(results, section):
        raise ValueError(f"results has no {section!r} section; nothing to plot")


def _grouped_bars(ax, groups: Sequence[str],
                  series: dict[str, tuple[np.ndarray, np.ndarray | None]], ylabel: str) -> None:
    """Bars of each series side by side at each group; ``series`` maps label -> (values, errors)."""
    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    for i, (label, (values, errors)) in enumerate(series.items()):
        ax.bar(x - 0.4 + (i + 0.5) * width, values, width, yerr=errors, capsize=2, label=label)
    crowded = len(groups) > 6  # long group lists (layers, kinds) get slanted labels
    ax.set_xticks(x, [str(g) for g in groups], rotation=30 if crowded else 0,
                  ha="right" if crowded else "center")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def _legend_below(fig, ax) -> None:
    """One legend under the axes, so it never hides a bar."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6),
               fontsize="small", frameon=False)


def _stat_arrays(stats: list[Stat], scale: float) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([s.mean * scale for s in stats], float),
            np.nan_to_num(np.array([s.std * scale for s in stats], float)))


def scores_by_method(results: Results, path: str | os.PathLike, *, block: str = "main") -> str:
    """Per-task scores (%) and the normalised average of the methods of one block (the methods
    that do not apply to the setting have no scores and no bars)."""
    _require(results, "methods")
    # Same row order as the report's table, so bars and rows line up.
    methods = {k: results.methods[k] for k in results.methods_in(block)
               if results.methods[k].applicable}
    if not methods:
        raise ValueError(f"results.methods has no scored method in block {block!r}; "
                         "nothing to plot")
    tasks = results.tasks
    labels = [m.label for m in methods.values()]
    fig, axes = _figure(max(8.0, 1.2 * len(tasks) * max(1, len(methods) / 4) + 4), 4.5, ncols=2,
                        width_ratios=[max(len(tasks), 1), 1 + len(methods) / 6])
    series = {label: _stat_arrays([m.per_task[t] for t in tasks], 100.0)
              for label, m in zip(labels, methods.values())}
    _grouped_bars(axes[0, 0], tasks, series, "exact match (%)")
    chance = results.chance
    for i, t in enumerate(tasks):
        if t in chance:
            axes[0, 0].hlines(chance[t] * 100, i - 0.45, i + 0.45, colors="k", linestyles="--",
                              linewidth=1, label="chance" if i == 0 else None)
    axes[0, 0].set_title(f"Per-task scores ({block.replace('_', ' ')}), mean ± std over seeds")
    _legend_below(fig, axes[0, 0])
    avg = _stat_arrays([m.avg_normalized for m in methods.values()], 1.0)
    ax = axes[0, 1]
    ax.bar(np.arange(len(labels)), avg[0], yerr=avg[1], capsize=2,
           color=[f"C{i}" for i in range(len(labels))])
    ax.set_xticks(np.arange(len(labels)), labels, rotation=60, ha="right", fontsize="small")
    ax.set_ylabel("normalised average")
    ax.set_title("Avg. norm.")
    ax.grid(axis="y", alpha=0.3)
    reference = methods.get("single_task")
    if reference is not None:  # the experts' own level, whatever the formula gives
        ax.axhline(reference.avg_normalized.mean, color="k", linestyle=":", linewidth=1)
    return _save(fig, path)


def overlap_heatmap(results: Results, path: str | os.PathLike) -> str:
    """The Jaccard matrix |Ci ∩ Cj| / |Ci ∪ Cj| of the core regions, each value written in."""
    _require(results, "overlap")
    tasks, matrix = results.overlap.tasks, np.asarray(results.overlap.matrix, float)
    n = len(tasks)
    fig, axes = _figure(1.2 * n + 2.5, 1.1 * n + 1.5)
    ax = axes[0, 0]
    # The diagonal is 1 by definition; scaling colours to the off-diagonal values keeps the
    # small overlaps that decide the groups (tau ~ 0.1) distinguishable. Diagonal in grey.
    off_diagonal = ~np.eye(n, dtype=bool)
    vmax = max(float(matrix[off_diagonal].max()) if n > 1 else 0.0, 1e-3)
    image = ax.imshow(np.ma.masked_array(matrix, ~off_diagonal), vmin=0.0, vmax=vmax,
                      cmap="viridis")
    ax.imshow(np.ma.masked_array(np.ones_like(matrix), off_diagonal), cmap="Greys", vmin=0, vmax=4)
    ax.set_xticks(range(n), tasks, rotation=30, ha="right")
    ax.set_yticks(range(n), tasks)
    for i in range(n):
        for j in range(n):
            bright = i == j or matrix[i, j] > 0.6 * vmax
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center",
                    color="black" if bright else "white", fontsize="small")
    seeds = len(results.overlap.per_seed)
    ax.set_title(f"Core overlap (Jaccard), mean over {seeds} seeds")
    fig.colorbar(image, ax=ax, shrink=0.8, label="Jaccard (off-diagonal scale)")
    return _save(fig, path)


def core_density(results: Results, path: str | os.PathLike) -> str:
    """Share of core entries per layer and per parameter kind, one bar per task."""
    _require(results, "core_density")
    density = results.core_density
    tasks = list(density)
    widest = max(len({g for t in tasks for g in getattr(density[t], f)})
                 for f in ("by_layer", "by_kind"))
    fig, axes = _figure(min(max(11.0, 0.12 * widest * (len(tasks) + 1) + 2), 30.0), 7.0, nrows=2)
    p = results.core_fraction
    for ax, field, title in ((axes[0, 0], "by_layer", "by layer"),
                             (axes[1, 0], "by_kind", "by parameter kind")):
        by = {t: getattr(density[t], field) for t in tasks}
        groups = list(dict.fromkeys(g for t in tasks for g in by[t]))
        series = {t: (np.array([by[t].get(g, np.nan) * 100 for g in groups]), None)
                  for t in tasks}
        _grouped_bars(ax, groups, series, "core entries (%)")
        ax.axhline(p * 100, color="k", linestyle="--", linewidth=1,
                   label=f"core fraction p = {p * 100:g}%")
        ax.set_title(f"Core density {title} (seed 0)")
    _legend_below(fig, axes[1, 0])
    return _save(fig, path)


_VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red", "not distinguishable": "tab:grey",
                    "undefined": "black"}


def paired_differences(results: Results, path: str | os.PathLike) -> str:
    """Forest plot of the paired comparisons: difference (A - B) and interval per row, the
    report's order top to bottom."""
    found = results.comparisons
    if found is None or not found.pairs:
        raise ValueError("results has no 'comparisons' section (or no pair in it); "
                         "nothing to plot")
    pairs = found.pairs

    def label(key):
        return results.methods[key].label if key in results.methods else (
            "Single-task experts" if key == "single_task" else key)

    fig, axes = _figure(9.0, max(2.5, 1.2 + 0.35 * len(pairs)))
    ax = axes[0, 0]
    y = np.arange(len(pairs))[::-1]  # first pair on top
    for yi, pair in zip(y, pairs):
        i, colour = pair.interval, _VERDICT_COLOURS[pair.verdict]
        if pair.verdict != "undefined":
            ax.hlines(yi, i.low, i.high, color=colour, linewidth=2)
        ax.plot([i.estimate], [yi], "o", color=colour)
    for verdict, colour in _VERDICT_COLOURS.items():
        if any(p.verdict == verdict for p in pairs):
            ax.plot([], [], "o-", color=colour, label=verdict)
    ax.axvline(0.0, color="k", linestyle="--", linewidth=1)
    ax.set_yticks(y, [f"{label(p.a)} − {label(p.b)}" for p in pairs], fontsize="small")
    ax.set_xlabel("difference of the normalised average (A − B)")
    confidence = pairs[0].interval.confidence
    ax.set_title(f"Paired differences, {confidence:.0%} bootstrap intervals over "
                 f"{len(results.seeds)} seeds and the held-out examples")
    ax.grid(axis="x", alpha=0.3)
    _legend_below(fig, ax)
    return _save(fig, path)
