"""Tests for cpift_jax.clustering: tau-linked components, stage orders, random groups."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpift_jax import clustering

# Tasks 0-1 and 2-3 overlap; nothing else does.
TWO_PAIRS = np.array(
    [
        [1.0, 0.3, 0.0, 0.05],
        [0.3, 1.0, 0.02, 0.0],
        [0.0, 0.02, 1.0, 0.15],
        [0.05, 0.0, 0.15, 1.0],
    ]
)


def test_two_components_at_paper_tau():
    assert clustering.cluster_tasks(TWO_PAIRS, 0.1) == [[0, 1], [2, 3]]


def test_threshold_is_inclusive_and_raising_it_splits_groups():
    assert clustering.cluster_tasks(TWO_PAIRS, 0.15) == [[0, 1], [2, 3]]
    assert clustering.cluster_tasks(TWO_PAIRS, 0.16) == [[0, 1], [2], [3]]
    assert clustering.cluster_tasks(TWO_PAIRS, 0.05) == [[0, 1, 2, 3]]


def test_chain_links_transitively():
    # 0-1 and 1-2 are linked, 0-2 is not: all three still form one group.
    overlap = np.eye(4)
    overlap[0, 1] = overlap[1, 0] = 0.2
    overlap[1, 2] = overlap[2, 1] = 0.2
    assert clustering.cluster_tasks(overlap, 0.1) == [[0, 1, 2], [3]]


def test_groups_sorted_and_ordered_by_smallest_index():
    overlap = np.zeros((5, 5))
    overlap[4, 1] = overlap[1, 4] = 0.5
    overlap[3, 0] = overlap[0, 3] = 0.5
    assert clustering.cluster_tasks(overlap, 0.1) == [[0, 3], [1, 4], [2]]


def test_diagonal_is_ignored_and_single_task_is_one_group():
    assert clustering.cluster_tasks(np.zeros((1, 1)), 0.1) == [[0]]
    assert clustering.cluster_tasks(np.eye(3), 1.0) == [[0], [1], [2]]


def test_accepts_rounding_asymmetry_and_nested_lists():
    overlap = [[1.0, 0.2], [0.2 + 1e-12, 1.0]]
    assert clustering.cluster_tasks(overlap, 0.2) == [[0, 1]]


@st.composite
def overlap_matrices(draw):
    n = draw(st.integers(1, 7))
    upper = np.array(
        draw(st.lists(st.floats(0.0, 1.0), min_size=n * n, max_size=n * n))
    ).reshape(n, n)
    matrix = np.triu(upper, 1)
    matrix = matrix + matrix.T
    np.fill_diagonal(matrix, 1.0)
    return matrix


@settings(max_examples=60, deadline=None)
@given(overlap_matrices(), st.floats(0.0, 1.0))
def test_groups_are_the_connected_components(overlap, tau):
    n = overlap.shape[0]
    groups = clustering.cluster_tasks(overlap, tau)
    assert sorted(t for g in groups for t in g) == list(range(n))
    assert all(g == sorted(g) for g in groups)
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    group_of = {t: k for k, g in enumerate(groups) for t in g}
    for i in range(n):
        for j in range(n):
            if i != j and overlap[i, j] >= tau:
                assert group_of[i] == group_of[j]
    for group in groups:  # each group is connected through links inside it
        reached, frontier = {group[0]}, [group[0]]
        while frontier:
            i = frontier.pop()
            for j in group:
                if j not in reached and overlap[i, j] >= tau:
                    reached.add(j)
                    frontier.append(j)
        assert reached == set(group)


@settings(max_examples=40, deadline=None)
@given(overlap_matrices())
def test_tau_zero_gives_one_group_and_tau_above_max_gives_singletons(overlap):
    n = overlap.shape[0]
    assert clustering.cluster_tasks(overlap, 0.0) == [list(range(n))]
    off_diagonal = overlap[~np.eye(n, dtype=bool)]
    top = off_diagonal.max() if n > 1 else 0.0
    if top < 1.0:
        tau = float(np.nextafter(top, 2.0))
        assert clustering.cluster_tasks(overlap, tau) == [[i] for i in range(n)]


@pytest.mark.parametrize(
    "overlap, tau, message",
    [
        (TWO_PAIRS, -0.1, r"tau=-0.1"),
        (TWO_PAIRS, 1.5, r"tau=1.5"),
        (TWO_PAIRS, float("nan"), r"tau=nan"),
        (TWO_PAIRS, "0.1", r"tau='0.1'"),
        (np.zeros((2, 3)), 0.1, r"square N x N matrix, got shape \(2, 3\)"),
        (np.zeros(3), 0.1, r"square N x N matrix, got shape \(3,\)"),
        (np.zeros((0, 0)), 0.1, "0 x 0: need at least one task"),
        ([[1.0, np.nan], [np.nan, 1.0]], 0.1, r"overlap\[0, 1\] is NaN"),
        ([[1.0, 1.5], [1.5, 1.0]], 0.1, r"overlap\[0, 1\] = 1.5 is outside \[0, 1\]"),
        ([[1.0, -0.2], [-0.2, 1.0]], 0.1, r"overlap\[0, 1\] = -0.2 is outside"),
        ([[1.0, 0.2], [0.3, 1.0]], 0.1,
         r"not symmetric: overlap\[0, 1\] = 0.2 but overlap\[1, 0\] = 0.3"),
    ],
)
def test_cluster_tasks_rejects_bad_input(overlap, tau, message):
    with pytest.raises(ValueError, match=message):
        clustering.cluster_tasks(overlap, tau)


GROUPS = [[0, 1], [2], [3, 4, 5], [6], [7, 8]]


def test_random_order_is_a_deterministic_permutation_per_seed():
    first = clustering.order_stages(GROUPS, "random", seed=3)
    assert first == clustering.order_stages(GROUPS, "random", seed=3)
    assert sorted(first) == sorted(GROUPS)
    orders = {str(clustering.order_stages(GROUPS, "random", seed=s)) for s in range(8)}
    assert len(orders) > 1  # the seed matters


def test_order_returns_new_lists_and_leaves_input_alone():
    groups = [[1, 2], [0]]
    ordered = clustering.order_stages(groups, "given")
    assert ordered == [[1, 2], [0]]
    ordered[0].append(9)
    assert groups == [[1, 2], [0]]


def test_largest_first_by_task_count_then_by_sizes():
    groups = [[0], [1, 2, 3], [4, 5]]
    assert clustering.order_stages(groups, "largest_first") == [[1, 2, 3], [4, 5], [0]]
    sizes = [10, 1, 1, 1, 2, 2]  # e.g. examples per task: group weights 10, 3, 4
    assert clustering.order_stages(groups, "largest_first", sizes=sizes) == [[0], [4, 5], [1, 2, 3]]
    # Ties keep the smallest task index first.
    assert clustering.order_stages([[3], [1], [2]], "largest_first") == [[1], [2], [3]]


def test_overlap_desc_puts_the_most_entangled_group_first():
    overlap = np.eye(5)
    for i, j, v in [(0, 1, 0.05), (0, 2, 0.05), (1, 3, 0.02)]:
        overlap[i, j] = overlap[j, i] = v
    # Mean overlap with tasks outside the group: [0] 0.1/4 = 0.025, [1, 2] 0.12/6 = 0.02,
    # [3, 4] 0.02/6.
    ordered = clustering.order_stages([[3, 4], [1, 2], [0]], "overlap_desc", overlap=overlap)
    assert ordered == [[0], [1, 2], [3, 4]]
    assert clustering.order_stages([[2], [0, 1]], "overlap_desc", overlap=np.eye(3)) == [
        [0, 1],
        [2],
    ]


@pytest.mark.parametrize(
    "groups, kwargs, message",
    [
        (GROUPS, {"strategy": "shortest"}, "unknown stage order 'shortest'; available: random"),
        (GROUPS, {"strategy": "overlap_desc"}, "needs the overlap matrix"),
        ([[0], [5]], {"strategy": "overlap_desc", "overlap": np.eye(3)}, "task 5 but overlap is 3"),
        ([[0], [1]], {"strategy": "largest_first", "sizes": [1]}, "one entry per task"),
        ([[0], [1]], {"strategy": "largest_first", "sizes": [1, -1]}, "finite and >= 0"),
        ([], {}, "non-empty list of lists"),
        ([[0], []], {}, r"groups\[1\] must be a non-empty list"),
        ([[0, 1], [1]], {}, r"task 1 is in both groups\[0\] and groups\[1\]"),
        ([[0, -1]], {}, r"groups\[0\] holds -1"),
        ([[0, 1.5]], {}, r"groups\[0\] holds 1.5"),
    ],
)
def test_order_stages_rejects_bad_input(groups, kwargs, message):
    with pytest.raises(ValueError, match=message):
        clustering.order_stages(groups, **kwargs)


def test_random_groups_written_out_sizes():
    groups = clustering.random_groups(5, 3, seed=0)
    assert sorted(len(g) for g in groups) == [1, 2, 2]
    assert groups == clustering.random_groups(5, 3, seed=0)
    assert clustering.random_groups(4, 1, seed=7) == [[0, 1, 2, 3]]
    assert clustering.random_groups(3, 3, seed=7) == [[0], [1], [2]]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 12), st.data(), st.integers(0, 2**32 - 1))
def test_random_groups_partition_into_k_balanced_groups(n, data, seed):
    k = data.draw(st.integers(1, n))
    groups = clustering.random_groups(n, k, seed)
    assert len(groups) == k
    assert sorted(t for g in groups for t in g) == list(range(n))
    assert all(g == sorted(g) and g for g in groups)
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    assert max(map(len, groups)) - min(map(len, groups)) <= 1
    assert groups == clustering.random_groups(n, k, seed)


def test_random_groups_depend_on_seed():
    assert len({str(clustering.random_groups(6, 3, seed=s)) for s in range(8)}) > 1


@pytest.mark.parametrize(
    "n, k, message",
    [(5, 6, "cannot split n_tasks=5 tasks into k=6"), (5, 0, "k=0"), (0, 1, "n_tasks=0"),
     (3.0, 1, "n_tasks=3.0")],
)
def test_random_groups_rejects_bad_sizes(n, k, message):
    with pytest.raises(ValueError, match=message):
        clustering.random_groups(n, k)


def test_backward_transfer_order_puts_the_most_fragile_groups_last():
    # transfer[i, j]: probe i's change of task j. Task 2 is hurt most by the others, task 0 least.
    transfer = np.array([[0.5, -0.1, -0.4],
                         [0.0, 0.6, -0.3],
                         [0.1, -0.2, 0.7]])
    # fragility: task0 -(0.0+0.1)/2 = -0.05, task1 -(-0.1-0.2)/2 = 0.15, task2 0.35
    groups = [[0], [1], [2]]
    assert clustering.order_stages(groups, "backward_transfer", transfer=transfer) == groups
    assert clustering.order_stages([[2], [0, 1]], "backward_transfer",
                                   transfer=transfer) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="needs transfer"):
        clustering.order_stages(groups, "backward_transfer")
    with pytest.raises(ValueError, match="finite 3 x 3"):
        clustering.order_stages(groups, "backward_transfer", transfer=np.zeros((2, 2)))


def test_structured_first_orders_by_probe_gain():
    assert clustering.order_stages([[0], [1, 2]], "structured_first",
                                   gains=[0.1, 0.9, 0.5]) == [[1, 2], [0]]
    with pytest.raises(ValueError, match="needs gains"):
        clustering.order_stages([[0]], "structured_first")
