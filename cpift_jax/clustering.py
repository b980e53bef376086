"""Task grouping and stage ordering for CPI-FT (arXiv 2508.21741, Sec. 3, step 3).

Tasks whose core regions overlap strongly are trained together: with the Jaccard overlap
``O[i, j] = |C_i ∩ C_j| / |C_i ∪ C_j|`` between the core regions of tasks i and j, the graph
with an edge i -- j (i != j) whenever ``O[i, j] >= tau`` is built, and its connected components
are the groups (paper: tau = 0.1). Each group becomes one stage of the pipeline; the paper orders
the stages at random, and ``order_stages`` also offers documented heuristics.

Everything here is small host-side bookkeeping on an N x N matrix (N = number of tasks), so it
uses numpy, and every result is deterministic: groups are sorted, and randomness comes only from
``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

__all__ = ["cluster_tasks", "order_stages", "random_groups", "STAGE_ORDERS"]

# Symmetry is checked to this absolute tolerance: an overlap matrix computed from float counts
# may differ from its transpose in the last bits, but not more.
_SYMMETRY_ATOL = 1e-9

STAGE_ORDERS = ("random", "given", "largest_first", "overlap_desc", "backward_transfer",
                "structured_first")


def _check_overlap(overlap) -> np.ndarray:
    """Returns ``overlap`` as a float64 array after checking it is a valid Jaccard matrix."""
    matrix = np.asarray(overlap, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"overlap must be a square N x N matrix, got shape {matrix.shape}")
    if matrix.shape[0] == 0:
        raise ValueError("overlap is 0 x 0: need at least one task")
    if np.isnan(matrix).any():
        i, j = np.argwhere(np.isnan(matrix))[0]
        raise ValueError(f"overlap[{i}, {j}] is NaN; Jaccard overlaps lie in [0, 1]")
    outside = (matrix < 0.0) | (matrix > 1.0)
    if outside.any():
        i, j = np.argwhere(outside)[0]
        raise ValueError(f"overlap[{i}, {j}] = {float(matrix[i, j])!r} is outside [0, 1]")
    asymmetry = np.abs(matrix - matrix.T)
    if (asymmetry > _SYMMETRY_ATOL).any():
        i, j = np.argwhere(asymmetry > _SYMMETRY_ATOL)[0]
        raise ValueError(
            f"overlap is not symmetric: overlap[{i}, {j}] = {float(matrix[i, j])!r} but "
            f"overlap[{j}, {i}] = {float(matrix[j, i])!r} (tolerance {_SYMMETRY_ATOL})"
        )
    return matrix


def _check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"tau must be a number in [0, 1], got tau={tau!r}")
    return float(tau)


def cluster_tasks(overlap, tau: float) -> list[list[int]]:
    """Connected components of the graph linking tasks i != j with ``overlap[i, j] >= tau``.

    Args:
      overlap: N x N symmetric matrix of Jaccard overlaps in [0, 1] (the diagonal is ignored).
      tau: link threshold in [0, 1] (paper: 0.1). ``tau = 0`` links every pair (one group);
        ``tau`` above the largest off-diagonal overlap leaves every task alone.

    Returns:
      The groups: each a sorted list of task indices, groups ordered by their smallest index.
    """
    tau = _check_tau(tau)
    matrix = _check_overlap(overlap)
    n = matrix.shape[0]
    linked = matrix >= tau
    np.fill_diagonal(linked, False)

    # Depth-first search from each unvisited task in index order; N is the number of tasks
    # (a handful), so the O(N^2) adjacency scan is nothing.
    component = [-1] * n
    groups: list[list[int]] = []
    for start in range(n):
        if component[start] >= 0:
            continue
        component[start] = len(groups)
        members, stack = [start], [start]
        while stack:
            for neighbour in np.flatnonzero(linked[stack.pop()]):
                if component[neighbour] < 0:
                    component[neighbour] = len(groups)
                    members.append(int(neighbour))
                    stack.append(int(neighbour))
        groups.append(sorted(members))
    return groups


def _check_groups(groups) -> list[list[int]]:
    """Copies ``groups`` into lists of ints after checking they are non-empty and disjoint."""
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups:
        raise ValueError(
            f"groups must be a non-empty list of lists of task indices, got {groups!r}"
        )
    seen: dict[int, int] = {}
    checked = []
    for g, group in enumerate(groups):
        if isinstance(group, (str, bytes)) or not isinstance(group, Sequence) or not group:
            raise ValueError(f"groups[{g}] must be a non-empty list of task indices, got {group!r}")
        members = []
        for task in group:
            if isinstance(task, bool) or not isinstance(task, numbers.Integral) or task < 0:
                raise ValueError(f"groups[{g}] holds {task!r}; task indices are integers >= 0")
            if int(task) in seen:
                raise ValueError(
                    f"task {int(task)} is in both groups[{seen[int(task)]}] and groups[{g}]"
                )
            seen[int(task)] = g
            members.append(int(task))
        checked.append(members)
    return checked


def _group_weights(groups: list[list[int]], sizes) -> list[float]:
    if sizes is None:
        return [float(len(group)) for group in groups]
    sizes = np.asarray(sizes, dtype=np.float64)
    needed = max(max(group) for group in groups) + 1
    if sizes.ndim != 1 or sizes.shape[0] < needed:
        raise ValueError(
            f"sizes must be a 1-D sequence with one entry per task (at least {needed}), "
            f"got shape {sizes.shape}"
        )
    if not np.isfinite(sizes).all() or (sizes < 0).any():
        raise ValueError(f"sizes must be finite and >= 0, got {sizes.tolist()}")
    return [float(sizes[group].sum()) for group in groups]


def _cross_overlap(groups: list[list[int]], overlap) -> list[float]:
    """Mean Jaccard overlap between each group's tasks and all tasks outside the group."""
    if overlap is None:
        raise ValueError("order_stages(strategy='overlap_desc') needs the overlap matrix")
    matrix = _check_overlap(overlap)
    n = matrix.shape[0]
    for g, group in enumerate(groups):
        if max(group) >= n:
            raise ValueError(f"groups[{g}] holds task {max(group)} but overlap is {n} x {n}")
    scores = []
    for group in groups:
        outside = np.setdiff1d(np.arange(n), group)
        scores.append(float(matrix[np.ix_(group, outside)].mean()) if outside.size else 0.0)
    return scores


def order_stages(
    groups: Sequence[Sequence[int]],
    strategy: str = "random",
    seed: int = 0,
    *,
    overlap=None,
    sizes=None,
    transfer=None,
    gains=None,
) -> list[list[int]]:
    """Orders the groups into pipeline stages (the groups themselves are left unchanged).

    Strategies (ties are always broken by the group's smallest task index, so the result is
    deterministic):

    - ``"random"``: the paper's choice, a uniformly random permutation of the groups drawn from
      ``numpy.random.default_rng(seed)``.
    - ``"given"``: the order passed in.
    - ``"largest_first"``: groups with the largest total size first, where a group's size is the
      sum of ``sizes[task]`` over its tasks (e.g. training examples or core-region sizes;
      default: the number of tasks). Rationale: the stages that must learn most do so while
      nothing is frozen yet; the small groups trained last lose least to the frozen cores.
    - ``"overlap_desc"``: groups ordered by their mean Jaccard overlap with tasks outside the
      group, ``mean_{i in G, j not in G} overlap[i, j]``, most entangled first (needs
      ``overlap``). Rationale: a later stage trains with earlier groups' cores frozen, so the
      groups whose cores collide most with other groups' cores go first, while little is frozen,
      and the most isolated groups go last, where freezing blocks the fewest of their entries.
    - ``"backward_transfer"``: ``transfer[i, j]`` is the change of task ``j``'s score caused by
      training on task ``i`` alone (the probes: expert ``i`` on task ``j`` minus the base model,
      ``i != j``; the diagonal is ignored). A task's fragility is how much the other tasks' probes
      hurt it, ``-mean_{i != j} transfer[i, j]``; groups are ordered by their tasks' mean
      fragility, least fragile first, so the most fragile groups are trained last and are not
      trained over afterwards (needs ``transfer``).
    - ``"structured_first"``: groups whose probes learned their tasks most clearly first:
      ``gains[t]`` is task ``t``'s probe gain over its floor (normalised, e.g. (expert - floor) /
      (1 - floor)); a group's key is its tasks' mean gain, highest first. Rationale: tasks with a
      clear learnable structure set up their cores while nothing is frozen; the weakly learned
      ones come last, where training continues from everything before (needs ``gains``).

    ``seed`` is only used by ``"random"``; ``overlap``, ``sizes``, ``transfer`` and ``gains``
    only by the heuristics that name them.

    Returns:
      A new list of the groups (each a list of ints) in stage order.
    """
    groups = _check_groups(groups)
    if strategy == "random":
        permutation = np.random.default_rng(seed).permutation(len(groups))
        return [groups[int(i)] for i in permutation]
    if strategy == "given":
        return groups
    if strategy == "largest_first":
        keys = [-w for w in _group_weights(groups, sizes)]
    elif strategy == "overlap_desc":
        keys = [-s for s in _cross_overlap(groups, overlap)]
    elif strategy == "backward_transfer":
        fragility = _fragility(transfer, 1 + max(max(g) for g in groups))
        keys = [float(np.mean(fragility[g])) for g in groups]
    elif strategy == "structured_first":
        if gains is None:
            raise ValueError("stage order 'structured_first' needs gains (one per task)")
        gains = np.asarray(gains, np.float64)
        keys = [-float(np.mean(gains[g])) for g in groups]
    else:
        raise ValueError(f"unknown stage order {strategy!r}; available: {', '.join(STAGE_ORDERS)}")
    order = sorted(range(len(groups)), key=lambda g: (keys[g], min(groups[g])))
    return [groups[g] for g in order]


def _fragility(transfer, n: int) -> np.ndarray:
    """``-mean_{i != j} transfer[i, j]`` per task ``j`` (``order_stages``)."""
    if transfer is None:
        raise ValueError("stage order 'backward_transfer' needs transfer (an N x N matrix)")
    matrix = np.asarray(transfer, np.float64)
    if matrix.shape != (n, n) or not np.isfinite(matrix).all():
        raise ValueError(f"transfer must be a finite {n} x {n} matrix (probe i's change of task "
                         f"j's score), got shape {matrix.shape}")
    if n == 1:
        return np.zeros(1)
    off = ~np.eye(n, dtype=bool)
    return -np.array([matrix[:, j][off[:, j]].mean() for j in range(n)])


def random_groups(n_tasks: int, k: int, seed: int = 0) -> list[list[int]]:
    """Splits tasks ``0..n_tasks-1`` into ``k`` random non-empty groups of balanced sizes.

    The "multi-stage random K" baseline of the paper (Sec. 4): a random permutation of the
    tasks from ``numpy.random.default_rng(seed)`` cut into ``k`` consecutive pieces whose
    sizes differ by at most one (``n_tasks = 5, k = 3`` gives two groups of 2 and one of 1).
    Like ``cluster_tasks``, each group is sorted and the groups are ordered by their smallest
    index; the stage order is then chosen by ``order_stages``.
    """
    for name, value in (("n_tasks", n_tasks), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}")
    if k > n_tasks:
        raise ValueError(f"cannot split n_tasks={n_tasks} tasks into k={k} non-empty groups")
    permutation = np.random.default_rng(seed).permutation(int(n_tasks))
    bounds = [math.floor(i * n_tasks / k) for i in range(k + 1)]
    groups = [sorted(int(t) for t in permutation[a:b]) for a, b in zip(bounds, bounds[1:])]
    return sorted(groups, key=min)
