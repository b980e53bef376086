"""Knobs over the CPI-FT benchmark: when does isolating parameters beat mixing them?

``grid(config, axes, root)`` runs ``pipeline.run`` once per cell of the grid spanned by one or
two knobs (``axes = [(knob, values), ...]``), each cell in its own workdir
``root/<knob>=<value>[,<knob2>=<value2>]``, and returns the cells (``Cell``: knob values,
workdir, config, ``aggregate.Results``). The grid resumes: a cell whose results are complete
(``results.json`` and ``results/DONE.json``, written with the same config) is read back
without running anything, and an unfinished one resumes stage by stage (``pipeline.run``). A
cell made with another config is refused naming the differing keys. The paired comparisons,
table and heat maps per cell are ``cpift_jax.benchmark.regime_map``.

A knob is a dotted config field (``suite.similarity``, ``cpift.p``, ...) or one of the aliases
in ``KNOBS``:

=============  =================================================================================
``conflict``   ``suite.similarity``: share of bare prompts (same digits, a different answer per
               task); values < 1 need ``--config.data.seq_len=72``
``tag``        ``suite.tag``: ``none`` | ``weak`` | ``strong`` (``strong`` needs seq_len 72)
``imbalance``  ``suite.imbalance``: first task's mixture weight / last task's (>= 1)
``capacity``   ``model.hidden_size = v`` and ``model.intermediate_size = 2 v`` (the toy's
               ratio); ``v`` must divide by ``model.num_heads``
``tasks``      the first ``n`` tasks of ``suite.tasks`` (n >= 2); ``multistage.k`` becomes
               ``min(k, n)`` and a forgetting pair outside them the last two of them
``p``          ``cpift.p``: core fraction
``tau``        ``cpift.tau``: overlap threshold linking two tasks
=============  =================================================================================

``sweep(config, knob, values, root)`` is the one-knob form: one row per value with every
method's mean avg-normalised score and its advantage over full multi-task SFT (method minus
``multitask_sft``; positive = better); ``format_table`` renders it. Methods that do not apply
to a setting (``aggregate.NOT_APPLICABLE``) have no score and are left out.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from cpift_jax.benchmark import aggregate, console, pipeline

__all__ = ["KNOBS", "Knob", "Cell", "parse_values", "with_knob", "cell_name", "grid", "sweep",
           "format_table"]

REFERENCE = "multitask_sft"
# Config keys a cell's workdir may change between runs (the pipeline ignores the same ones).
IGNORED_KEYS = ("progress", "compile_cache")


# ------------------------------------------------------------------------------------- knobs

@dataclasses.dataclass(frozen=True)
class Knob:
    """A named knob: what it sets (``doc``) and ``apply(config, value)`` (edits in place)."""
    doc: str
    apply: Callable


def _field(knob: str) -> Knob:
    return Knob(f"config field {knob}", lambda config, value: _set_field(config, knob, value))


def _capacity(config, width) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"knob 'capacity' must be a positive int (model.hidden_size), got "
                         f"{width!r}")
    if width % config.model.num_heads:
        raise ValueError(f"knob 'capacity' = {width} does not divide by model.num_heads = "
                         f"{config.model.num_heads}")
    config.model.hidden_size, config.model.intermediate_size = width, 2 * width


def _num_tasks(config, n) -> None:
    if "tasks" in config.data:
        raise ValueError("knob 'tasks' takes a prefix of suite.tasks (the synthetic suite); this "
                         "config names real datasets in data.tasks")
    every = tuple(config.suite.tasks)
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= len(every):
        raise ValueError(f"knob 'tasks' must be an int in [2, {len(every)}] (a prefix of "
                         f"suite.tasks = {every}), got {n!r}")
    kept = every[:n]
    config.suite.tasks = kept
    if config.suite.mixture:  # explicit weights are aligned with the tasks
        config.suite.mixture = tuple(config.suite.mixture)[:n]
    config.multistage.k = min(config.multistage.k, n)
    if not set(config.forgetting.pair) <= set(kept):
        config.forgetting.pair = kept[-2:]


KNOBS: dict[str, Knob] = {
    "conflict": _field("suite.similarity"),
    "tag": _field("suite.tag"),
    "imbalance": _field("suite.imbalance"),
    "capacity": Knob("model.hidden_size = v, model.intermediate_size = 2 v", _capacity),
    "tasks": Knob("the first n tasks of suite.tasks (multistage.k and forgetting.pair follow)",
                  _num_tasks),
    "p": _field("cpift.p"),
    "tau": _field("cpift.tau"),
}


def parse_values(text: str) -> list:
    """``"0,0.25,0.5"`` / ``"none,weak"`` -> Python values (literals where they parse)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"empty value in {text!r}")
        try:
            out.append(ast.literal_eval(item))
        except (ValueError, SyntaxError):
            out.append(item)
    return out


def _set_field(config, knob: str, value) -> None:
    *parents, leaf = knob.split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node:
            raise ValueError(f"unknown knob {knob!r}: no field {'.'.join(parents[:i + 1])!r} "
                             f"(aliases: {', '.join(KNOBS)})")
        node = node[part]
    if leaf not in node:
        raise ValueError(f"unknown knob {knob!r}: no field {knob!r} in the config (aliases: "
                         f"{', '.join(KNOBS)})")
    node[leaf] = value  # ConfigDict casts an int to a float field's type itself


def with_knob(config, knob: str, value):
    """A copy of ``config`` with ``knob`` (an alias of ``KNOBS`` or a dotted field) set; unknown
    fields raise."""
    config = config.copy_and_resolve_references()
    if knob in KNOBS:
        KNOBS[knob].apply(config, value)
    else:
        _set_field(config, knob, value)
    return config


# -------------------------------------------------------------------------------------- grid

@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid cell: its knob values (in axis order), workdir, config and results."""
    name: str
    knobs: dict
    workdir: Path
    config: object  # ml_collections.ConfigDict
    results: aggregate.Results


def cell_name(knobs: dict) -> str:
    """``{"conflict": 0.5, "p": 0.01}`` -> ``"conflict=0.5,p=0.01"`` (the cell's directory)."""
    parts = []
    for knob, value in knobs.items():
        text = f"{knob}={value}"
        if "/" in text or "," in str(value) or text.startswith("."):
            raise ValueError(f"knob {knob!r} value {value!r} cannot name a directory (no '/' or "
                             "',' in values)")
        parts.append(text)
    return ",".join(parts)


def _finished(cfg, workdir: Path) -> aggregate.Results | None:
    """The results of a completed cell, after checking it was made with ``cfg``; else None."""
    if not ((workdir / "results.json").exists() and (workdir / "results" / "DONE.json").exists()):
        return None
    from cpift_jax.benchmark.workdir import Workdir
    Workdir(workdir, cfg.to_dict(), ignore_keys=IGNORED_KEYS)  # raises on another config
    return aggregate.Results.load(workdir / "results.json")


def grid(config, axes: Sequence[tuple[str, Sequence]], root) -> list[Cell]:
    """Every cell of the grid over ``axes`` (one or two ``(knob, values)``), the first knob
    varying slowest; completed cells are read back, the others run (or resumed)."""
    if not 1 <= len(axes) <= 2:
        raise ValueError(f"a grid takes one or two knobs, got {len(axes)}")
    knobs = [k for k, _ in axes]
    if len(set(knobs)) != len(knobs):
        raise ValueError(f"the two knobs must differ, got {knobs}")
    for knob, values in axes:
        if not values:
            raise ValueError(f"knob {knob!r} needs at least one value")
        if len({str(v) for v in values}) != len(values):
            raise ValueError(f"knob {knob!r} has repeated values {list(values)}")
    combos = [{}]
    for knob, values in axes:
        combos = [{**c, knob: v} for c in combos for v in values]
    configs = []
    for combo in combos:  # every cell's config is checked before the first one runs
        cfg = config
        for knob, value in combo.items():
            cfg = with_knob(cfg, knob, value)
        pipeline.check_config(cfg)
        configs.append(cfg)
    cells = []
    for i, (combo, cfg) in enumerate(zip(combos, configs)):
        name = cell_name(combo)
        workdir = Path(root) / name
        results = _finished(cfg, workdir)
        if results is None:
            console.progress.info("cell %d/%d %s: running", i + 1, len(combos), name)
            results = pipeline.run(cfg, workdir)
        else:
            console.progress.info("cell %d/%d %s: done in an earlier run", i + 1, len(combos),
                                  name)
        cells.append(Cell(name, combo, workdir, cfg, results))
    return cells


# ------------------------------------------------------------------------------ one knob

def sweep(config, knob: str, values: Sequence, root) -> list[dict]:
    """``[{"value", "scores": {method: mean avg_normalized}, "advantage": {method: delta}}]``."""
    if not values:
        raise ValueError("sweep needs at least one value")
    return rows_of(grid(config, [(knob, list(values))], root))


def rows_of(cells: Sequence[Cell]) -> list[dict]:
    """One-knob rows (``sweep``) of a one-knob grid's cells."""
    rows = []
    for cell in cells:
        (value,) = cell.knobs.values()
        scores = {k: m.avg_normalized.mean for k, m in cell.results.methods.items()
                  if m.applicable}
        ref = scores.get(REFERENCE, math.nan)
        rows.append({"value": value, "scores": scores,
                     "advantage": {k: v - ref for k, v in scores.items() if k != REFERENCE}})
    return rows


def format_table(knob: str, rows: list[dict]) -> str:
    """Markdown: one row per value; cells ``score (advantage over multi-task SFT)``."""
    methods = list(dict.fromkeys(m for row in rows for m in row["scores"]))
    lines = [f"| {knob} | " + " | ".join(methods) + " |",
             "|--:|" + "--:|" * len(methods)]
    for row in rows:
        cells = []
        for m in methods:
            if m not in row["scores"]:  # not applicable at this value
                cells.append("n/a")
                continue
            cell = f"{row['scores'][m]:.3f}"
            if m in row["advantage"]:
                cell += f" ({row['advantage'][m]:+.3f})"
            cells.append(cell)
        lines.append(f"| {row['value']} | " + " | ".join(cells) + " |")
    lines.append(f"Avg. normalised score (mean over seeds); in brackets: minus {REFERENCE}.")
    return "\n".join(lines)
