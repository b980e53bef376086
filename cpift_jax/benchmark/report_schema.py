"""Checks of a benchmark ``results`` dict before it is reported, and small readers of it.

The schema is the one ``cpift_jax.benchmark.pipeline`` writes to ``results.json``::

    config: dict            timings: {total_s, stages: {stage: s}}     seeds: [int]
    tasks: [task]           chance: {task: float}                      normalization: str
    methods: {key: {label, block: main|ablation|merge_only, budget,
                    per_task: {task: {mean, std}}, avg_normalized: {mean, std},
                    per_seed: [{seed, per_task: {task: float}, avg_normalized}]}}
    forgetting: {pair: [A, B], methods: {key: {label, drop_a: {mean, std}, gain_b: {..}}}}
    overlap: {tasks, matrix: n x n Jaccard (mean over seeds), per_seed: [n x n]}
    groups: {per_seed: [[[task, ...], ...]]}          (stage order)
    core_density: {task: {by_layer: {group: fraction}, by_kind: {kind: fraction}}}

Scores are in [0, 1]. Any top-level section may be absent (a partial run); a section that is
present must be well-formed, and a malformed one raises ``ValueError`` naming the key path,
e.g. ``results['methods']['cpift']['per_task'] is missing task(s) 'logic'``, rather than being
silently skipped or partly drawn.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

__all__ = ["BLOCKS", "MAIN_ORDER", "is_number", "block_of", "ordered_methods", "task_order",
           "check_results", "core_fraction"]

BLOCKS = ("main", "ablation", "merge_only")
# Row order of the main block: the paper's Table 1 order, baselines first, CPI-FT last; any other
# main key follows in insertion order. Other blocks keep insertion order.
MAIN_ORDER = ("single_task", "multitask_sft", "multitask_sft_equal_steps", "multistage_random",
              "multistage_heuristic", "fused_only", "cpift")
_PREFIX_BLOCKS = (("ablation_", "ablation"), ("merge_", "merge_only"))


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def block_of(key: str, method: dict) -> str:
    """The method's stated block, else the one its key prefix implies (ablation_, merge_)."""
    if "block" in method:
        return method["block"]
    return next((block for prefix, block in _PREFIX_BLOCKS if key.startswith(prefix)), "main")


def ordered_methods(results: dict, block: str) -> list[str]:
    """Keys of the methods in ``block``, in report order."""
    keys = [k for k, m in (results.get("methods") or {}).items() if block_of(k, m) == block]
    if block == "main":
        keys = [k for k in MAIN_ORDER if k in keys] + [k for k in keys if k not in MAIN_ORDER]
    return keys


def task_order(results: dict) -> list[str]:
    """``results['tasks']``, else the tasks of the methods' ``per_task`` in first-seen order."""
    if "tasks" in results:
        return list(results["tasks"])
    seen = {}
    for method in (results.get("methods") or {}).values():
        if isinstance(method, dict) and isinstance(method.get("per_task"), dict):
            seen.update(dict.fromkeys(method["per_task"]))
    return list(seen)


def _fail(where: str, problem: str) -> None:
    raise ValueError(f"{where} {problem}")


def _expect(value: Any, kind: type | tuple, where: str, what: str) -> None:
    if not isinstance(value, kind):
        _fail(where, f"must be {what}, got {type(value).__name__}: {value!r:.80}")


def _check_number(value: Any, where: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not is_number(value):
        _fail(where, f"must be a number, got {value!r:.80}")


def _check_stat(value: Any, where: str) -> None:
    """``{"mean": float, "std": float}``; a None/NaN mean is allowed and shown as n/a."""
    _expect(value, dict, where, "a dict {'mean': float, 'std': float}")
    if "mean" not in value:
        _fail(where, f"has no 'mean' (keys: {sorted(value)})")
    _check_number(value["mean"], f"{where}['mean']", allow_none=True)
    _check_number(value.get("std"), f"{where}['std']", allow_none=True)


def _check_task_dict(value: Any, tasks: list[str], where: str) -> None:
    _expect(value, dict, where, "a dict keyed by task")
    missing = [t for t in tasks if t not in value]
    if missing:
        _fail(where, f"is missing task(s) {', '.join(map(repr, missing))}; every task of "
                     f"results['tasks'] is expected: {', '.join(tasks)}")
    extra = [t for t in value if t not in tasks]
    if extra:
        _fail(where, f"has task(s) not in results['tasks']: {', '.join(map(repr, extra))}")


def _check_method(key: str, method: Any, tasks: list[str]) -> None:
    where = f"results['methods'][{key!r}]"
    _expect(method, dict, where, "a dict")
    block = block_of(key, method)
    if block not in BLOCKS:
        _fail(f"{where}['block']", f"is {block!r}; expected one of {', '.join(BLOCKS)}")
    if "per_task" not in method:
        _fail(where, "has no 'per_task'")
    _check_task_dict(method["per_task"], tasks, f"{where}['per_task']")
    for task, stat in method["per_task"].items():
        _check_stat(stat, f"{where}['per_task'][{task!r}]")
    if "avg_normalized" in method:
        _check_stat(method["avg_normalized"], f"{where}['avg_normalized']")
    for i, row in enumerate(method.get("per_seed", [])):
        row_where = f"{where}['per_seed'][{i}]"
        _expect(row, dict, row_where, "a dict {'seed', 'per_task', 'avg_normalized'}")
        for field in ("seed", "per_task", "avg_normalized"):
            if field not in row:
                _fail(row_where, f"has no {field!r}")
        _check_task_dict(row["per_task"], tasks, f"{row_where}['per_task']")
        _check_number(row["avg_normalized"], f"{row_where}['avg_normalized']", allow_none=True)


def _check_square(matrix: Any, n: int, where: str) -> None:
    _expect(matrix, list, where, "a list of rows")
    shape = f"{len(matrix)}x{'/'.join(str(len(r)) if isinstance(r, list) else '?' for r in matrix)}"
    if len(matrix) != n or any(not isinstance(r, list) or len(r) != n for r in matrix):
        _fail(where, f"is {shape}; expected a square {n}x{n} matrix matching "
                     "results['overlap']['tasks']")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            _check_number(v, f"{where}[{i}][{j}]")


def _check_overlap(overlap: Any) -> None:
    _expect(overlap, dict, "results['overlap']", "a dict {'tasks', 'matrix', 'per_seed'}")
    if "tasks" not in overlap or "matrix" not in overlap:
        _fail("results['overlap']", f"needs 'tasks' and 'matrix' (keys: {sorted(overlap)})")
    n = len(overlap["tasks"])
    _check_square(overlap["matrix"], n, "results['overlap']['matrix']")
    for s, matrix in enumerate(overlap.get("per_seed", [])):
        _check_square(matrix, n, f"results['overlap']['per_seed'][{s}]")


def _check_forgetting(forgetting: Any) -> None:
    where = "results['forgetting']"
    _expect(forgetting, dict, where, "a dict {'pair', 'methods'}")
    pair = forgetting.get("pair")
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        _fail(f"{where}['pair']", f"must be [A task, B task], got {pair!r}")
    _expect(forgetting.get("methods", {}), dict, f"{where}['methods']", "a dict keyed by method")
    for key, method in forgetting.get("methods", {}).items():
        _expect(method, dict, f"{where}['methods'][{key!r}]", "a dict")
        for field in ("drop_a", "gain_b"):
            if field not in method:
                _fail(f"{where}['methods'][{key!r}]", f"has no {field!r}")
            _check_stat(method[field], f"{where}['methods'][{key!r}][{field!r}]")


def _check_core_density(density: Any) -> None:
    _expect(density, dict, "results['core_density']", "a dict keyed by task")
    for task, by in density.items():
        where = f"results['core_density'][{task!r}]"
        _expect(by, dict, where, "a dict {'by_layer', 'by_kind'}")
        for field in ("by_layer", "by_kind"):
            if field not in by:
                _fail(where, f"has no {field!r}")
            _expect(by[field], dict, f"{where}[{field!r}]", "a dict group -> fraction")
            for group, v in by[field].items():
                _check_number(v, f"{where}[{field!r}][{group!r}]")


def _check_groups(groups: Any) -> None:
    _expect(groups, dict, "results['groups']", "a dict {'per_seed'}")
    for s, seed_groups in enumerate(groups.get("per_seed", [])):
        where = f"results['groups']['per_seed'][{s}]"
        _expect(seed_groups, list, where, "a list of groups (lists of task names)")
        for g, group in enumerate(seed_groups):
            _expect(group, list, f"{where}[{g}]", "a list of task names")


def check_results(results: Any) -> None:
    """Raises ``ValueError`` naming the key path of the first malformed section."""
    _expect(results, dict, "results", "a dict (the contents of results.json)")
    tasks = task_order(results)
    if "tasks" in results:
        _expect(results["tasks"], list, "results['tasks']", "a list of task names")
        if len(set(tasks)) != len(tasks):
            _fail("results['tasks']", f"has duplicates: {tasks}")
    if "seeds" in results:
        _expect(results["seeds"], list, "results['seeds']", "a list of ints")
    if "chance" in results:
        _expect(results["chance"], dict, "results['chance']", "a dict task -> float")
        for task, v in results["chance"].items():
            _check_number(v, f"results['chance'][{task!r}]")
    if "timings" in results:
        _expect(results["timings"], dict, "results['timings']", "a dict {'total_s', 'stages'}")
        for stage, v in (results["timings"].get("stages") or {}).items():
            _check_number(v, f"results['timings']['stages'][{stage!r}]")
    if "methods" in results:
        _expect(results["methods"], dict, "results['methods']", "a dict keyed by method")
        for key, method in results["methods"].items():
            _check_method(key, method, tasks)
    checks = {"overlap": _check_overlap, "forgetting": _check_forgetting,
              "core_density": _check_core_density, "groups": _check_groups}
    for section, check in checks.items():
        if results.get(section):
            check(results[section])


def core_fraction(config: Any) -> float | None:
    """The core fraction p from a config dict: the shallowest ``core_fraction`` key, else a ``p``
    at the top or under a key naming the core/CPI-FT/mask settings (``config.cpift.p``); None
    when neither is a number in (0, 1]."""
    fallback = None
    queue = deque([("", config)])
    while queue:  # breadth first, so the main setting wins over a nested ablation sweep
        parent, node = queue.popleft()
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            ok = is_number(value) and not math.isnan(value) and 0 < value <= 1
            if key == "core_fraction" and ok:
                return float(value)
            if key == "p" and ok and fallback is None and (parent == "" or any(
                    word in parent.lower() for word in ("core", "cpift", "mask"))):
                fallback = float(value)
            queue.append((str(key), value))
    return fallback
