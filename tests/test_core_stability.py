"""Core stability: Jaccard across seeds and probe lengths against the random-set chance level."""


import numpy as np
import pytest

from cpift_jax.benchmark import core_stability


def test_chance_jaccard_matches_simulated_random_sets():
    rng = np.random.default_rng(0)
    n, k1, k2 = 2000, 100, 60
    simulated = []
    for _ in range(2000):
        a = set(rng.choice(n, k1, replace=False).tolist())
        b = set(rng.choice(n, k2, replace=False).tolist())
        simulated.append(len(a & b) / len(a | b))
    assert core_stability.chance_jaccard(k1, k2, n) == pytest.approx(np.mean(simulated), rel=0.03)
    assert core_stability.chance_jaccard(10, 10, 1000) == pytest.approx(0.01 / 1.99)  # p/(2-p), p = 1%
    with pytest.raises(ValueError, match="k1"):
        core_stability.chance_jaccard(5, 1, 4)


def mask(indices, n=20):
    m = np.zeros(n, bool)
    m[list(indices)] = True
    return {"w": m.reshape(4, 5)}


def test_summarize_counts_every_pair_exactly():
    full = {0: {"a": mask({0, 1, 2, 3})}, 1: {"a": mask({2, 3, 4, 5})}, 2: {"a": mask({0, 1, 2, 3})}}
    half = {0: {"a": mask({0, 1})}, 1: {"a": mask({2, 3, 4, 5})}}
    out = core_stability.summarize(["a"], full, half)["a"]
    # seed pairs: (0,1) 2/6, (0,2) 1, (1,2) 2/6
    assert out["across_seeds"]["jaccard"] == pytest.approx((2 / 6 + 1 + 2 / 6) / 3)
    assert out["across_seeds"]["min_jaccard"] == pytest.approx(2 / 6)
    assert out["across_seeds"]["pairs"] == 3
    chance = core_stability.chance_jaccard(4, 4, 20)
    assert out["across_seeds"]["chance"] == pytest.approx(chance)
    assert out["across_seeds"]["lift"] == pytest.approx(np.mean([2 / 6, 1, 2 / 6]) / chance)
    # lengths: seed 0 half {0,1} vs full {0,1,2,3} = 2/4; seed 1 identical = 1; seed 2 has none
    assert out["across_lengths"]["jaccard"] == pytest.approx(0.75)
    assert out["across_lengths"]["pairs"] == 2
    single = core_stability.summarize(["a"], {0: full[0]})["a"]
    assert single == {"across_seeds": None, "across_lengths": None}
    table = core_stability.format_table({"a": out})
    assert table.splitlines()[2].startswith("| a | 0.556 (x")
