"""Is a task's core structural or arbitrary? Its Jaccard overlap across seeds and probe lengths.

A core found by a probe is *structural* if probes trained differently find the same entries:
across seeds (another data sample and batch order, the same base model) and across probe lengths
(half the budget vs the full budget of one seed). Each overlap is compared with the overlap of
two *random* sets of the same sizes: for sets of ``k1`` and ``k2`` entries drawn uniformly from
``n``, ``E|A & B| = k1 k2 / n``, and the chance level used here is

    J_chance = E|A & B| / (k1 + k2 - E|A & B|)

(the ratio of the expectations; the Jaccard of two sets of p = 1% of n entries is ~0.005).
``lift = J / J_chance``: 1 means the core is as arbitrary as a random set of its size.

What it means for CPI-FT: transplanting copies a task's core from its own probe and freezing
protects those entries later. If another seed's probe would have marked mostly different
entries (a lift near 1), the transplanted and frozen entries are one sample of many equally
good ones, and the gain of isolation must come from where the entries lie (layers, kinds), not
from the entries themselves.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from cpift_jax import masks

__all__ = ["chance_jaccard", "summarize", "format_table"]

Pytree = Any


def chance_jaccard(k1: int, k2: int, n: int) -> float:
    """The Jaccard chance level of two uniformly random sets of ``k1`` and ``k2`` of ``n``."""
    if not 0 <= k1 <= n or not 0 <= k2 <= n or n < 1:
        raise ValueError(f"need 0 <= k1, k2 <= n and n >= 1, got k1={k1}, k2={k2}, n={n}")
    if k1 == 0 and k2 == 0:
        return 1.0
    both = k1 * k2 / n
    return both / (k1 + k2 - both)


def _size(mask: Pytree) -> tuple[int, int]:
    """(entries in the core, entries in the model)."""
    return int(masks.density(mask)["count"]), sum(int(np.size(x)) for x in jax.tree.leaves(mask))


def _pair(a: Pytree, b: Pytree) -> dict[str, float]:
    (ka, n), (kb, _) = _size(a), _size(b)
    j = masks.jaccard(a, b)
    chance = chance_jaccard(ka, kb, n)
    return {"jaccard": j, "chance": chance, "lift": j / chance if chance > 0 else float("nan")}


def _mean(rows: Sequence[dict]) -> dict[str, float] | None:
    if not rows:
        return None
    return {k: float(np.mean([r[k] for r in rows])) for k in ("jaccard", "chance", "lift")} | {
        "min_jaccard": float(min(r["jaccard"] for r in rows)), "pairs": len(rows)}


def summarize(tasks: Sequence[str], full: Mapping[int, Mapping[str, Pytree]],
              half: Mapping[int, Mapping[str, Pytree]] | None = None) -> dict:
    """Per task: ``across_seeds`` (every pair of seeds' full-budget cores) and
    ``across_lengths`` (each seed's half-budget core against its full-budget core), each with the
    mean Jaccard, the mean chance level, the mean lift, the smallest Jaccard and the number of
    pairs (None where there is no pair: one seed, or no half-budget probes).

    ``full[seed][task]`` and ``half[seed][task]``: core masks of one base model."""
    seeds = sorted(full)
    out = {}
    for t in tasks:
        across_seeds = [_pair(full[a][t], full[b][t]) for a, b in itertools.combinations(seeds, 2)]
        across_lengths = [_pair(half[s][t], full[s][t]) for s in seeds
                          if half is not None and s in half]
        out[t] = {"across_seeds": _mean(across_seeds), "across_lengths": _mean(across_lengths)}
    return out


def format_table(summary: Mapping[str, dict]) -> str:
    """Markdown: one row per task, Jaccard (lift over chance) across seeds and lengths."""
    def cell(stat):
        if stat is None:
            return "n/a"
        return f"{stat['jaccard']:.3f} (x{stat['lift']:.1f}; chance {stat['chance']:.4f})"

    rows = ["| Task | across seeds | half vs full budget |", "|:--|--:|--:|"]
    rows += [f"| {t} | {cell(s['across_seeds'])} | {cell(s['across_lengths'])} |"
             for t, s in summary.items()]
    return "\n".join(rows)
