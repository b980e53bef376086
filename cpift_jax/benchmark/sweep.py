"""One knob over the CPI-FT benchmark: when does isolating parameters beat mixing them?

``sweep(config, knob, values, root)`` runs ``pipeline.run`` once per value, with the dotted
config field ``knob`` (e.g. ``suite.similarity``) set to it, in ``root/<knob>=<value>`` (so a
rerun resumes), and returns one row per value: every method's mean avg-normalised score and its
advantage over full multi-task SFT (method minus ``multitask_sft``; positive = better). Methods
that do not apply to a setting (``aggregate.NOT_APPLICABLE``) have no score and are left out.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from pathlib import Path

from cpift_jax.benchmark import console, pipeline

__all__ = ["parse_values", "with_knob", "sweep", "format_table"]

REFERENCE = "multitask_sft"


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


def with_knob(config, knob: str, value):
    """A copy of ``config`` with the dotted field ``knob`` set; unknown fields raise."""
    config = config.copy_and_resolve_references()
    *parents, leaf = knob.split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node:
            raise ValueError(f"unknown knob {knob!r}: no field {'.'.join(parents[:i + 1])!r}")
        node = node[part]
    if leaf not in node:
        raise ValueError(f"unknown knob {knob!r}: no field {knob!r} in the config")
    node[leaf] = value  # ConfigDict casts an int to a float field's type itself
    return config


def sweep(config, knob: str, values: Sequence, root) -> list[dict]:
    """``[{"value", "scores": {method: mean avg_normalized}, "advantage": {method: delta}}]``."""
    if not values:
        raise ValueError("sweep needs at least one value")
    rows = []
    for value in values:
        cfg = with_knob(config, knob, value)
        workdir = Path(root) / f"{knob}={value}"
        results = pipeline.run(cfg, workdir)
        console.progress.info("%s = %s: done (results in %s)", knob, value,
                              workdir / "results.md")
        scores = {k: m.avg_normalized.mean for k, m in results.methods.items() if m.applicable}
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
