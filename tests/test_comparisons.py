"""Paired comparisons of the benchmark (cpift_jax.benchmark.comparisons, and the vectorised
two-level bootstrap of cpift_jax.benchmark.statistics) against known cases: exact formulas for
the bootstrap's moments, an enumeration of every seed draw, constructed per-example arrays and a
loop reference of the report's normalisation."""

import itertools
import time

import numpy as np
import pytest

from cpift_jax.benchmark import aggregate, comparisons, statistics
from cpift_jax.benchmark.workdir import Workdir

EXPERT = comparisons.EXPERT


class _Config:
    def __init__(self, seeds):
        self.seeds = tuple(seeds)


def _workdir(tmp_path, stages: dict) -> Workdir:
    """A Workdir whose stages returned ``stages[name]`` (as the pipeline's stages would)."""
    wd = Workdir(tmp_path, {"any": "config"})
    for name, result in stages.items():
        wd.run(name, lambda d, result=result: result)
    return wd


def _stages(per_seed: dict) -> dict:
    """``{seed: {method: {task: [values]}}}`` -> stage results (experts hold ``single_task``
    per task and the base model)."""
    out = {}
    for seed, by_method in per_seed.items():
        expert = by_method[EXPERT]
        tasks = list(expert)
        out[f"seed{seed}/experts"] = {
            "scores": {t: {u: float(np.mean(expert[u])) for u in tasks} for t in tasks},
            # expert t on task u: its own task's values on u == t, else something else
            "per_example": {t: {u: expert[u] if u == t else [0.0] * len(expert[u])
                                for u in tasks} for t in tasks},
            "base": {t: 0.0 for t in tasks},
            "base_per_example": by_method.get("base", {t: [0.0] * len(expert[t]) for t in tasks})}
        for method, values in by_method.items():
            if method in (EXPERT, "base"):
                continue
            out[f"seed{seed}/{comparisons.stage_of(method)}"] = {
                "per_task": {t: float(np.mean(v)) for t, v in values.items()},
                "per_example": values}
    return out


def test_per_example_gathers_every_method_in_one_array(tmp_path):
    data = {s: {EXPERT: {"a": [1, 1, s], "b": [1, 0]},
                "fused_only": {"a": [0, 1, 0], "b": [0, 0]},
                "cpift": {"a": [1, 0, 0], "b": [s, 1]},
                "base": {"a": [0, 0, 1], "b": [1, 1]}} for s in (0, 1)}
    wd = _workdir(tmp_path, _stages(data))
    methods = [EXPERT, "cpift", "fused_only", "base"]
    x = comparisons.per_example(wd, _Config([1, 0]), ["a", "b"], methods)
    assert set(x) == {"a", "b"}
    assert x["a"].shape == (2, 3, 4) and x["b"].shape == (2, 2, 4) and x["a"].dtype == np.float64
    for i, seed in enumerate((1, 0)):  # config.seeds order
        for j, method in enumerate(methods):
            for t in ("a", "b"):
                np.testing.assert_array_equal(x[t][i, :, j], data[seed][method][t])


def test_per_example_names_the_stage_that_cannot_be_paired(tmp_path):
    data = {0: {EXPERT: {"a": [1, 1, 0]}, "cpift": {"a": [1, 0, 0]},
                "multitask_sft": {"a": [1, 0]}}}
    stages = _stages(data)
    stages["seed0/merge_ties"] = {"status": "not_applicable", "reason": "needs 2 models"}
    stages["seed0/merge_linear"] = {"per_task": {"a": 0.5}}  # written before per-example values
    wd = _workdir(tmp_path, stages)
    config = _Config([0])
    with pytest.raises(ValueError, match=r"stage seed0/multitask_sft: task 'a' has 2 per-example "
                                         r"values but stage seed0/experts has 3"):
        comparisons.per_example(wd, config, ["a"], [EXPERT, "multitask_sft"])
    with pytest.raises(ValueError, match=r"stage seed0/merge_ties: method 'merge_ties' was not "
                                         r"applicable \(needs 2 models\)"):
        comparisons.per_example(wd, config, ["a"], ["merge_ties"])
    with pytest.raises(ValueError, match=r"stage seed0/merge_linear: result has no "
                                         r"'per_example' values of task 'a'"):
        comparisons.per_example(wd, config, ["a"], ["merge_linear"])
    with pytest.raises(FileNotFoundError, match="stage 'seed0/fusion' has not completed"):
        comparisons.per_example(wd, config, ["a"], ["fused_only"])


def test_replicates_draw_whole_seeds_shared_by_tasks_and_methods():
    # Column 0 holds the seed's index on every example: a replicate slot's mean is the index of
    # the seed it drew. Columns 1 and 2 are one method twice: paired draws keep them equal.
    rng = np.random.default_rng(0)
    n_seeds = 4
    samples = {}
    for task, n in (("a", 7), ("b", 30)):
        x = rng.random((n_seeds, n))
        seed_id = np.broadcast_to(np.arange(n_seeds, dtype=float)[:, None], (n_seeds, n))
        samples[task] = np.stack([seed_id, x, x], axis=2)
    reps = statistics.resampled_means(samples, 3000, seed=1)
    drawn = reps["a"][..., 0]
    np.testing.assert_allclose(drawn, np.round(drawn), atol=1e-12)  # one seed per slot
    np.testing.assert_array_equal(reps["a"][..., 0], reps["b"][..., 0])  # same seeds per task
    np.testing.assert_array_equal(reps["b"][..., 1], reps["b"][..., 2])  # same examples per method
    frequency = np.bincount(np.round(drawn).astype(int).ravel(), minlength=n_seeds) / drawn.size
    np.testing.assert_allclose(frequency, 1 / n_seeds, atol=0.02)
    again = statistics.resampled_means(samples, 3000, seed=1)
    np.testing.assert_array_equal(again["b"], reps["b"])  # a pure function of its inputs


def test_replicate_variance_matches_the_two_level_formula():
    # Mean over S drawn seeds of a seed's example mean, each from its own example draw:
    # Var = (Var_s(mu_s) + mean_s(sigma_s^2) / n) / S, with population (ddof 0) moments.
    rng = np.random.default_rng(2)
    n_seeds, n = 4, 40
    x = rng.random((n_seeds, n)) + np.arange(n_seeds)[:, None] * 0.3
    samples = {"t": x[:, :, None]}
    reps = statistics.resampled_means(samples, 20000, seed=3)["t"][..., 0].mean(axis=1)
    expected = (x.mean(axis=1).var() + x.var(axis=1).mean() / n) / n_seeds
    assert reps.mean() == pytest.approx(x.mean(), abs=3 * np.sqrt(expected / 20000))
    assert reps.var() == pytest.approx(expected, rel=0.05)
    se = statistics.bootstrap_standard_error(statistics.resampled_means(samples, 4000, seed=4)["t"])
    assert se[0] == pytest.approx(np.sqrt(expected), rel=0.05)


def test_interval_from_seed_variation_only_matches_an_enumeration_of_every_draw():
    # Every example of a seed scores the same: resampling examples changes nothing, and the
    # statistic of a replicate is the mean over a draw of 3 seeds out of 3 with replacement.
    diffs = np.array([0.1, -0.05, 0.3])
    a = np.broadcast_to((0.5 + diffs)[:, None], (3, 20))
    b = np.full((3, 20), 0.5)
    samples = {"t": np.stack([a, b], axis=2)}
    interval = statistics.bootstrap(samples, statistics.difference_of_means(0, 1),
                                    resamples=8000, seed=5)
    atoms = np.sort([np.mean(diffs[list(d)]) for d in itertools.product(range(3), repeat=3)])

    def cdf(v, strict=False):
        return np.mean(atoms < v - 1e-12) if strict else np.mean(atoms <= v + 1e-12)

    for end, q in ((interval.low, 0.025), (interval.high, 0.975)):
        assert np.min(np.abs(atoms - end)) < 1e-12  # an end is one of the possible draws
        assert cdf(end, strict=True) <= q + 0.01 and cdf(end) >= q - 0.01
    assert interval.estimate == pytest.approx(diffs.mean())


def test_a_constant_improvement_has_a_degenerate_interval_and_identical_methods_zero():
    ones, zeros = np.ones((3, 25)), np.zeros((3, 25))
    samples = {t: np.stack([ones, zeros, ones, zeros], axis=2) for t in ("a", "b")}
    methods = [EXPERT, "x", "cpift", "y"]
    result = comparisons.analyse(samples, methods, {"a": 0.0, "b": 0.0},
                                 [("cpift", "x"), ("x", "cpift"), ("x", "y")], resamples=300)
    up, down, same = (result.intervals[p] for p in [("cpift", "x"), ("x", "cpift"), ("x", "y")])
    assert (up.estimate, up.low, up.high, up.verdict) == (1.0, 1.0, 1.0, "better")
    assert (down.estimate, down.low, down.high, down.verdict) == (-1.0, -1.0, -1.0, "worse")
    assert (same.estimate, same.low, same.high, same.verdict) == (
        0.0, 0.0, 0.0, "not distinguishable")
    assert result.per_seed[("cpift", "x")] == (1.0, 1.0, 1.0)
    assert result.standard_errors["cpift"] == {"a": 0.0, "b": 0.0}


def _loop_reference(data, seeds, tasks, floors, a, b):
    """Per-seed normalised differences with plain loops and aggregate.normalized_average."""
    out = []
    for s in seeds:
        score = {m: {t: float(np.mean(data[s][m][t])) for t in tasks} for m in (a, b, EXPERT)}
        out.append(aggregate.normalized_average(score[a], score[EXPERT], floors)
                   - aggregate.normalized_average(score[b], score[EXPERT], floors))
    return out


def test_compare_matches_a_loop_reference_of_the_report_normalisation(tmp_path):
    rng = np.random.default_rng(6)
    tasks, seeds, n = ("a", "b", "c"), (0, 1, 2), 60
    floors = {"a": 0.1, "b": 0.25, "c": 0.5}
    skill = {EXPERT: 0.85, "cpift": 0.75, "multitask_sft": 0.6, "fused_only": 0.4}
    data = {s: {m: {t: list((rng.random(n) < p).astype(float)) for t in tasks}
                for m, p in skill.items()} for s in seeds}
    data[1][EXPERT]["c"] = [1.0] * 31 + [0.0] * 29  # 0.517: within 0.05 of c's floor, left out
    wd = _workdir(tmp_path, _stages(data))
    pairs = [("cpift", "multitask_sft"), ("fused_only", "cpift"), ("cpift", EXPERT)]
    found = comparisons.compare(wd, _Config(seeds), tasks, floors, pairs, resamples=500)
    assert list(found) == pairs
    samples = comparisons.per_example(wd, _Config(seeds), tasks,
                                      [EXPERT, "cpift", "multitask_sft", "fused_only"])
    analysis = comparisons.analyse(samples, [EXPERT, "cpift", "multitask_sft", "fused_only"],
                                   floors, pairs, resamples=500)
    for a, b in pairs:
        reference = _loop_reference(data, seeds, tasks, floors, a, b)
        assert analysis.per_seed[(a, b)] == pytest.approx(reference, abs=1e-12)
        assert found[(a, b)].estimate == pytest.approx(np.mean(reference), abs=1e-12)
        assert found[(a, b)] == analysis.intervals[(a, b)]  # same data and draws: same interval
        assert found[(a, b)].low < found[(a, b)].estimate < found[(a, b)].high
    assert found[("cpift", "multitask_sft")].verdict == "better"
    assert found[("fused_only", "cpift")].verdict == "worse"


def test_analyse_refuses_pairs_without_values_or_floors():
    samples = {"a": np.zeros((1, 2, 2))}
    with pytest.raises(ValueError, match=r"methods \['cpift'\] are compared but have no "
                                         r"per-example values"):
        comparisons.analyse(samples, [EXPERT, "x"], {"a": 0.0}, [("cpift", "x")])
    with pytest.raises(ValueError, match=r"no floor .* for task\(s\) \['a'\]"):
        comparisons.analyse(samples, [EXPERT, "x"], {}, [("x", EXPERT)])


def test_forgetting_intervals_are_paired_differences_of_means(tmp_path):
    stages = {}
    for s in (0, 1):
        stages[f"seed{s}/forgetting"] = {m: {
            "drop_a": 0.0, "gain_b": 0.0, "acc": {},
            "per_example": {"after_a": {"a": [1, 1, 1, 1], "b": [0, 0, 0]},
                            "after_ab": {"a": [1, 0, 1, 0] if m == "full_sft" else [1, 1, 1, s],
                                         "b": [1, 1, s]},
                            "base_b": [0, 0, 0]}} for m in ("full_sft", "cpift")}
    wd = _workdir(tmp_path, stages)
    found = comparisons.forgetting_intervals(wd, (0, 1), ("a", "b"), ["full_sft", "cpift"],
                                             resamples=400)
    full, cpift = found["full_sft"], found["cpift"]
    assert (full["drop_a"].estimate, full["drop_a"].verdict) == (-0.5, "worse")
    assert cpift["drop_a"].estimate == pytest.approx(-0.125)  # seed 0: -1/4, seed 1: 0
    assert cpift["gain_b"].estimate == pytest.approx(0.5 * (2 / 3 + 1))
    assert cpift["gain_b"].verdict == "better"
    stages["seed1/forgetting"]["cpift"].pop("per_example")
    wd = _workdir(tmp_path / "old", stages)
    with pytest.raises(ValueError, match="stage seed1/forgetting: method 'cpift' has no "
                                         "per-example values"):
        comparisons.forgetting_intervals(wd, (0, 1), ("a", "b"), ["cpift"])


def test_two_thousand_resamples_of_a_five_seed_benchmark_take_well_under_a_second():
    rng = np.random.default_rng(7)
    methods = [EXPERT, "cpift", "multitask_sft", "multitask_sft_equal_steps",
               "multistage_random", "multistage_heuristic", "fused_only", "merge_ties"]
    samples = {t: (rng.random((5, 500, len(methods))) < 0.6).astype(float) for t in "abcde"}
    pairs = [("cpift", m) for m in methods if m != "cpift"] + [("merge_ties", EXPERT)]
    floors = {t: 0.1 for t in samples}
    seconds = []
    for _ in range(2):  # the faster of two: another job may share the cores
        start = time.perf_counter()
        comparisons.analyse(samples, methods, floors, pairs, resamples=2000)
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 1.0, seconds
