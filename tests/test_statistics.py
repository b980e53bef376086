"""Paired bootstrap intervals over seeds and test examples, and the verdict read from them."""

import numpy as np
import pytest

from cpift_jax.benchmark import statistics


def test_verdict_is_read_from_the_interval():
    assert statistics.verdict(0.01, 0.2) == "better"
    assert statistics.verdict(-0.3, -0.02) == "worse"
    assert statistics.verdict(-0.1, 0.1) == "not distinguishable"
    assert statistics.verdict(0.0, 0.1) == "not distinguishable"  # touching 0 is not excluding it
    assert statistics.verdict(float("nan"), 0.1) == "undefined"


def test_identical_methods_give_a_zero_interval():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (3, 50, 1)).astype(float)
    samples = {"a": np.concatenate([x, x], axis=2)}
    interval = statistics.bootstrap(samples, statistics.difference_of_means(0, 1), resamples=200)
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert interval.verdict == "not distinguishable"


def test_width_matches_the_paired_standard_error_with_one_seed():
    # One seed: only examples are resampled, so the interval of the mean paired difference
    # is about +-1.96 * sd(d) / sqrt(n) around it.
    rng = np.random.default_rng(1)
    n = 400
    a = (rng.random(n) < 0.6).astype(float)
    b = np.where(rng.random(n) < 0.8, a, 1 - a)  # correlated with a: pairing matters
    samples = {"t": np.stack([a, b], axis=1)[None]}
    interval = statistics.bootstrap(samples, statistics.difference_of_means(0, 1),
                                    resamples=2000, seed=3)
    d = a - b
    se = d.std(ddof=1) / np.sqrt(n)
    assert interval.estimate == pytest.approx(d.mean())
    assert (interval.high - interval.low) == pytest.approx(2 * 1.96 * se, rel=0.1)
    unpaired = np.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
    assert se < 0.8 * unpaired  # the paired interval is the narrower one here


def test_a_clearly_better_method_is_better_and_the_reverse_is_worse():
    rng = np.random.default_rng(2)
    good = (rng.random((5, 200)) < 0.7).astype(float)
    bad = (rng.random((5, 200)) < 0.4).astype(float)
    samples = {"t": np.stack([good, bad], axis=2)}
    assert statistics.bootstrap(samples, statistics.difference_of_means(0, 1),
                                resamples=500).verdict == "better"
    assert statistics.bootstrap(samples, statistics.difference_of_means(1, 0),
                                resamples=500).verdict == "worse"


def test_normalised_difference_by_hand():
    # One seed, one example per task: means are the scores themselves.
    samples = {"x": np.array([[[0.6, 0.4, 0.9]]]), "y": np.array([[[0.5, 0.5, 0.5]]])}
    chance = {"x": 0.1, "y": 0.25}
    statistic = statistics.difference_of_normalised(0, 1, expert=2, chance=chance)
    norm0 = np.mean([(0.6 - 0.1) / 0.8, (0.5 - 0.25) / 0.25])
    norm1 = np.mean([(0.4 - 0.1) / 0.8, (0.5 - 0.25) / 0.25])
    interval = statistics.bootstrap(samples, statistic, resamples=50)
    assert interval.estimate == pytest.approx(norm0 - norm1)
    at_chance = statistics.difference_of_normalised(0, 1, expert=2, chance={"x": 0.9, "y": 0.5})
    assert np.isnan(statistics.bootstrap(samples, at_chance, resamples=10).estimate)


def test_bad_shapes_are_refused_naming_the_task():
    with pytest.raises(ValueError, match="task 'b'"):
        statistics.bootstrap({"a": np.zeros((2, 3, 2)), "b": np.zeros((2, 3))},
                             statistics.difference_of_means(0, 1))
    with pytest.raises(ValueError, match="same seeds and methods"):
        statistics.bootstrap({"a": np.zeros((2, 3, 2)), "b": np.zeros((3, 3, 2))},
                             statistics.difference_of_means(0, 1))


def test_standard_error():
    assert statistics.standard_error([1, 0, 1, 0]) == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)
    assert np.isnan(statistics.standard_error([1]))


def test_normalised_leaves_out_a_seeds_tasks_whose_expert_is_near_the_floor():
    # [seeds, methods] means; method 0 is scored, method 1 is the expert.
    means = {"x": np.array([[0.5, 0.9], [0.4, 0.9]]), "y": np.array([[0.3, 0.27], [0.6, 0.8]])}
    chance = {"x": 0.1, "y": 0.25}
    # Seed 0: y's expert is 0.02 above its floor (< MIN_EXPERT_GAP), so x alone counts.
    expected = [0.4 / 0.8, np.mean([0.3 / 0.8, 0.35 / 0.55])]
    assert statistics.normalised(means, 0, 1, chance) == pytest.approx(expected)
    # Leading axes are replicates: each is normalised on its own.
    batched = {t: np.stack([v, v[::-1]]) for t, v in means.items()}
    np.testing.assert_allclose(statistics.normalised(batched, 0, 1, chance),
                               [expected, expected[::-1]])
    assert np.isnan(statistics.normalised(means, 0, 1, {"x": 0.9, "y": 0.8})).all()


def test_bootstrap_many_shares_one_resampling():
    rng = np.random.default_rng(4)
    samples = {"t": rng.random((3, 40, 3))}
    fns = {"01": statistics.difference_of_means(0, 1), "10": statistics.difference_of_means(1, 0)}
    both = statistics.bootstrap_many(samples, fns, resamples=300, seed=2)
    assert both["01"] == statistics.bootstrap(samples, fns["01"], resamples=300, seed=2)
    assert (both["01"].low, both["01"].high) == pytest.approx((-both["10"].high,
                                                                -both["10"].low))
