"""Sweeps and the regime map: knobs and their aliases, the grid's cells and resuming (pipeline
runs faked), the comparisons per cell on a hand-written workdir, the table and heat maps, and
one 2x2 grid end to end on configs/toy.py:smoke."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import toy
from cpift_jax.benchmark import aggregate, pipeline
from cpift_jax.benchmark import sweep


def test_parse_values():
    assert sweep.parse_values("0, 0.25,0.5") == [0, 0.25, 0.5]
    assert sweep.parse_values("none,weak") == ["none", "weak"]
    with pytest.raises(ValueError, match="empty value"):
        sweep.parse_values("1,,2")


def test_with_knob_sets_a_copy_and_refuses_unknown_fields():
    config = toy.get_config("smoke")
    original = config.suite.similarity
    changed = sweep.with_knob(config, "suite.similarity", 0)
    assert changed.suite.similarity == 0.0 and isinstance(changed.suite.similarity, float)
    assert config.suite.similarity == original
    with pytest.raises(ValueError, match="no field 'suite.nope'"):
        sweep.with_knob(config, "suite.nope", 1)
    with pytest.raises(ValueError, match="no field 'nope'"):
        sweep.with_knob(config, "nope.x", 1)


def test_sweep_rows_and_advantage(monkeypatch, tmp_path):
    seen = []

    def row(mean):
        return aggregate.MethodRow("m", "main", "b", avg_normalized=aggregate.Stat(mean, 0.0))

    def fake_run(config, workdir):
        seen.append((config.suite.similarity, str(workdir)))
        s = config.suite.similarity
        methods = {"multitask_sft": row(1.0 - s), "cpift": row(0.9)}
        if s > 0:  # an operator that does not apply at this value: no score, no column entry
            methods["merge_x"] = aggregate.MethodRow("x", "merge_only", "b",
                                                     status=aggregate.NOT_APPLICABLE, reason="r")
        else:
            methods["merge_x"] = row(0.2)
        return aggregate.Results(config={}, core_fraction=0.01, seeds=(0,), tasks=("t",),
                                 chance={"t": 0.0}, normalization="", methods=methods)

    monkeypatch.setattr(pipeline, "run", fake_run)
    rows = sweep.sweep(toy.get_config("smoke"), "suite.similarity", [0.0, 0.5], tmp_path)
    assert [v for v, _ in seen] == [0.0, 0.5]
    assert seen[1][1].endswith("suite.similarity=0.5")
    assert rows[0]["advantage"] == {"cpift": pytest.approx(-0.1), "merge_x": pytest.approx(-0.8)}
    assert rows[1]["advantage"] == {"cpift": pytest.approx(0.4)}
    table = sweep.format_table("suite.similarity", rows)
    assert "| suite.similarity | multitask_sft | cpift | merge_x |" in table
    assert "| 0.5 | 0.500 | 0.900 (+0.400) | n/a |" in table


# ------------------------------------------------------------------------------ knob aliases

def test_aliases_set_their_fields():
    config = toy.get_config("smoke")
    assert sweep.with_knob(config, "conflict", 0.5).suite.similarity == 0.5
    assert sweep.with_knob(config, "tag", "strong").suite.tag == "strong"
    assert sweep.with_knob(config, "imbalance", 4).suite.imbalance == 4.0
    assert sweep.with_knob(config, "p", 0.02).cpift.p == 0.02
    assert sweep.with_knob(config, "tau", 0.3).cpift.tau == 0.3
    wide = sweep.with_knob(config, "capacity", 32)
    assert (wide.model.hidden_size, wide.model.intermediate_size) == (32, 64)
    with pytest.raises(ValueError, match="num_heads"):
        sweep.with_knob(config, "capacity", 33)


def test_tasks_alias_takes_a_prefix_and_keeps_the_config_valid():
    config = toy.get_config("smoke")  # arith program logic strings recall; pair logic -> strings
    three = sweep.with_knob(config, "tasks", 3)
    assert three.suite.tasks == ("arith", "program", "logic")
    assert three.multistage.k == 3
    assert tuple(three.forgetting.pair) == ("program", "logic")  # strings is gone
    two = sweep.with_knob(config, "tasks", 2)
    assert two.multistage.k == 2 and tuple(two.forgetting.pair) == ("arith", "program")
    four = sweep.with_knob(config, "tasks", 4)
    assert tuple(four.forgetting.pair) == ("logic", "strings")  # still inside: unchanged
    for c in (two, three, four):
        pipeline.check_config(c)
    for bad in (1, 6, 2.0):
        with pytest.raises(ValueError, match=r"knob 'tasks' must be an int in \[2, 5\]"):
            sweep.with_knob(config, "tasks", bad)


# ------------------------------------------------------------------------------ the grid

def test_cell_names():
    assert sweep.cell_name({"conflict": 0.5, "p": 0.01}) == "conflict=0.5,p=0.01"
    assert sweep.cell_name({"suite.tag": "weak"}) == "suite.tag=weak"
    with pytest.raises(ValueError, match="cannot name a directory"):
        sweep.cell_name({"cpift.backbone": "/tmp/x"})


def _results(value: float) -> aggregate.Results:
    row = aggregate.MethodRow("m", "main", "b", per_task={"t": aggregate.Stat(value, 0.0)},
                              avg_normalized=aggregate.Stat(value, 0.0))
    return aggregate.Results(config={}, core_fraction=0.01, seeds=(0,), tasks=("t",),
                             chance={"t": 0.0}, normalization="",
                             methods={"multitask_sft": row, "cpift": row})


def _finishing_run(calls, fail_at=None):
    """A pipeline.run stand-in that leaves what the real one leaves in a finished workdir."""
    from cpift_jax.benchmark.workdir import Workdir
    from cpift_jax.training.checkpoints import write_json

    def run(config, workdir):
        calls.append(workdir.name)
        if workdir.name == fail_at:
            raise KeyboardInterrupt  # the grid is interrupted in this cell
        Workdir(workdir, config.to_dict(), ignore_keys=sweep.IGNORED_KEYS)
        results = _results(config.cpift.p)
        results.save(workdir / "results.json")
        write_json(workdir / "results" / "DONE.json", {"result": {}, "seconds": 0.0})
        return results

    return run


def test_grid_runs_each_cell_in_its_workdir_and_resumes(monkeypatch, tmp_path):
    config = toy.get_config("smoke")
    axes = [("p", [0.01, 0.05]), ("suite.imbalance", [1, 4])]
    calls = []
    names = ["p=0.01,suite.imbalance=1", "p=0.01,suite.imbalance=4",
             "p=0.05,suite.imbalance=1", "p=0.05,suite.imbalance=4"]
    monkeypatch.setattr(pipeline, "run", _finishing_run(calls, fail_at=names[2]))
    with pytest.raises(KeyboardInterrupt):
        sweep.grid(config, axes, tmp_path)
    assert calls == names[:3]

    calls.clear()
    monkeypatch.setattr(pipeline, "run", _finishing_run(calls))
    cells = sweep.grid(config, axes, tmp_path)
    assert calls == names[2:]  # the finished cells are read back, not run again
    assert [c.name for c in cells] == names
    assert [c.workdir for c in cells] == [tmp_path / n for n in names]
    assert [c.knobs for c in cells] == [{"p": p, "suite.imbalance": i}
                                        for p in (0.01, 0.05) for i in (1, 4)]
    assert [(c.config.cpift.p, c.config.suite.imbalance) for c in cells] == [
        (0.01, 1.0), (0.01, 4.0), (0.05, 1.0), (0.05, 4.0)]
    assert cells[0].results.methods["cpift"].avg_normalized.mean == 0.01  # read from its file

    calls.clear()  # the same root with another config: refused, naming the key
    changed = toy.get_config("smoke")
    changed.train.steps_per_task = 7
    with pytest.raises(ValueError, match="train.steps_per_task"):
        sweep.grid(changed, axes, tmp_path)
    assert calls == []


def test_grid_checks_every_cell_before_running_any(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(pipeline, "run", _finishing_run(calls))
    with pytest.raises(ValueError, match="cpift.tau"):
        sweep.grid(toy.get_config("smoke"), [("p", [0.01]), ("tau", [0.1, 2.0])], tmp_path)
    assert calls == []
    with pytest.raises(ValueError, match="must differ"):
        sweep.grid(toy.get_config("smoke"), [("p", [0.01]), ("p", [0.1])], tmp_path)


# ------------------------------------------------------------------------------ the regime map

TASKS, CHANCE = ("arith", "logic"), {"arith": 0.1, "logic": 0.05}
RATES = {"single_task": 0.9, "cpift": 0.8, "multitask_sft": 0.5, "merge_linear": 0.6,
         "merge_ties": 0.3}
DROPS = {"full_sft": (-0.3, -0.5), "multistage": (-0.2, -0.1), "cpift": (-0.05, -0.02)}
FORGET_EXAMPLES, NOISY = 200, "multistage"  # NOISY's per-example drops vary; the others' do not


def _forgetting_values(rng, pair):
    """Per seed and method, what forgetting.run_seed records: scores in [0, 1] after A and
    after A -> B on both tasks, and the base model's on B. On A, after A -> B is after A plus
    DROPS[method][seed] on every example, plus N(0, 0.3) noise per example for NOISY."""
    import numpy as np

    a, b = pair
    out = {}
    for s in (0, 1):
        base_b = rng.random(FORGET_EXAMPLES)
        for k, d in DROPS.items():
            after_a = {t: rng.random(FORGET_EXAMPLES) for t in pair}
            after_ab = {a: after_a[a] + d[s], b: rng.random(FORGET_EXAMPLES)}
            if k == NOISY:
                after_ab[a] = after_ab[a] + rng.normal(0.0, 0.3, FORGET_EXAMPLES)
            out[s, k] = {"after_a": after_a, "after_ab": after_ab, "base_b": base_b}
    return out


def _forgetting_result(forget, s, per_example=True):
    """The stage result of seed ``s``: drops and gains from the values, and the values."""
    import numpy as np

    out = {}
    for k in DROPS:
        v = forget[s, k]
        (a, after_ab_a), (b, after_ab_b) = v["after_ab"].items()
        out[k] = {"drop_a": float(np.mean(after_ab_a) - np.mean(v["after_a"][a])),
                  "gain_b": float(np.mean(after_ab_b) - np.mean(v["base_b"]))}
        if per_example:
            out[k]["per_example"] = {
                "after_a": {t: x.tolist() for t, x in v["after_a"].items()},
                "after_ab": {t: x.tolist() for t, x in v["after_ab"].items()},
                "base_b": v["base_b"].tolist()}
    return out


def _fabricated_cell(tmp_path, merges=("merge_linear", "merge_ties"), forgetting_examples=True):
    """A finished two-seed cell written by hand: 0/1 per-example scores of known rates, and the
    forgetting stage of ``_forgetting_values`` (without its per-example values, as an older
    cpift_jax wrote it, unless ``forgetting_examples``). Returns the cell, the method scores
    and the forgetting values."""
    import numpy as np

    from cpift_jax.training.checkpoints import write_json

    config = toy.get_config("smoke")
    config.seeds = (0, 1)
    rng = np.random.default_rng(0)
    values = {(s, m, t): (rng.random(40) < RATES[m]).astype(float).tolist()
              for s in (0, 1) for m in RATES for t in TASKS}
    forget = _forgetting_values(rng, tuple(config.forgetting.pair))

    def done(stage, result):
        write_json(tmp_path / stage / "DONE.json", {"result": result, "seconds": 0.0})

    for s in (0, 1):
        done(f"seed{s}/experts", {
            "scores": {t: {u: float(np.mean(values[s, "single_task", u])) for u in TASKS}
                       for t in TASKS},
            "per_example": {t: {u: values[s, "single_task", u] for u in TASKS} for t in TASKS}})
        for m in ("cpift", "multitask_sft", *merges):
            done(f"seed{s}/{m}", {"per_task": {t: float(np.mean(values[s, m, t])) for t in TASKS},
                                  "per_example": {t: values[s, m, t] for t in TASKS}})
        done(f"seed{s}/forgetting", _forgetting_result(forget, s, forgetting_examples))

    def method(m, block="main"):
        score = float(np.mean([np.mean(values[s, m, t]) for s in (0, 1) for t in TASKS]))
        return aggregate.MethodRow(m, block, "b", avg_normalized=aggregate.Stat(score, 0.0))

    methods = {m: method(m) for m in ("single_task", "multitask_sft", "cpift")}
    methods.update({m: method(m, "merge_only") for m in merges})
    methods["merge_dare"] = aggregate.MethodRow("dare", "merge_only", "b",
                                                status=aggregate.NOT_APPLICABLE, reason="r")
    results = aggregate.Results(config={}, core_fraction=0.05, seeds=(0, 1), tasks=TASKS,
                                chance=CHANCE, normalization="", methods=methods)
    cell = sweep.Cell("p=0.05,tau=0.1", {"p": 0.05, "tau": 0.1}, tmp_path, config, results)
    return cell, values, forget


def _normalised_difference(values, a, b):
    """Float64 reference: mean over seeds of the difference of avg-normalised scores."""
    import numpy as np

    def norm(m, s):
        return np.mean([(np.mean(values[s, m, t]) - CHANCE[t])
                        / (np.mean(values[s, "single_task", t]) - CHANCE[t]) for t in TASKS])

    return float(np.mean([norm(a, s) - norm(b, s) for s in (0, 1)]))


def _drops(forget, method, seeds=(0, 1)):
    """Float64 reference: per seed, the mean over A's examples of after A -> B minus after A."""
    import numpy as np

    out = []
    for s in seeds:
        v = forget[s, method]
        a = next(iter(v["after_ab"]))
        out.append(float(np.mean(v["after_ab"][a] - v["after_a"][a])))
    return out


def test_analyse_cell_compares_against_the_best_merge_and_reads_forgetting(tmp_path):
    import numpy as np

    from cpift_jax.benchmark import regime_map

    cell, values, forget = _fabricated_cell(tmp_path)
    assert regime_map.best_merge(cell.results) == "merge_linear"
    rows = {r["comparison"]: r for r in regime_map.analyse_cell(cell, resamples=300)}
    assert list(rows) == list(regime_map.COMPARISONS)
    for name, (a, b), want in [("cpift_minus_multitask_sft", ("cpift", "multitask_sft"), "better"),
                               ("cpift_minus_best_merge", ("cpift", "merge_linear"), "better"),
                               ("best_merge_minus_experts", ("merge_linear", "single_task"),
                                "worse")]:
        r = rows[name]
        assert (r["a"], r["b"], r["cell"], r["knobs"]) == (a, b, cell.name, cell.knobs)
        assert r["estimate"] == pytest.approx(_normalised_difference(values, a, b), abs=1e-12)
        assert r["low"] <= r["estimate"] <= r["high"] and r["verdict"] == want
        assert r["resamples"] == 300
    drop = rows["forgetting_drop_full_sft"]
    assert drop["estimate"] == pytest.approx(np.mean(_drops(forget, "full_sft")), abs=1e-12)
    # After A -> B is after A shifted by the seed's drop on every example: a draw of examples
    # shared by both columns cancels, so the replicates' means are x0, x1 or their mean and the
    # interval is [-0.5, -0.3]. A draw not paired across the columns would widen it.
    assert (drop["low"], drop["high"], drop["verdict"]) == (pytest.approx(-0.5),
                                                            pytest.approx(-0.3), "worse")
    assert drop["resamples"] == 300 and drop["note"] == ""
    diff = rows["forgetting_cpift_minus_full_sft"]
    per_seed = np.subtract(_drops(forget, "cpift"), _drops(forget, "full_sft"))  # 0.25, 0.48
    assert diff["estimate"] == pytest.approx(per_seed.mean(), abs=1e-12)
    assert (diff["low"], diff["high"]) == (pytest.approx(per_seed.min()),
                                           pytest.approx(per_seed.max()))
    assert diff["verdict"] == "better"
    # Per-example noise on top of the seed's drop: resampling the examples reaches past the
    # seeds' own drops, which an interval over seeds only never does.
    noisy, seeds_only = rows[f"forgetting_drop_{NOISY}"], _drops(forget, NOISY)
    assert noisy["estimate"] == pytest.approx(np.mean(seeds_only), abs=1e-12)
    assert noisy["low"] < min(seeds_only) and noisy["high"] > max(seeds_only)


def test_one_seed_forgetting_intervals_resample_the_examples(tmp_path):
    import numpy as np

    from cpift_jax.benchmark import regime_map

    cell, _, forget = _fabricated_cell(tmp_path, merges=())
    cell.config.seeds = (0,)
    rows = {r["comparison"]: r for r in regime_map.analyse_cell(cell, resamples=2000)}
    shifted = rows["forgetting_drop_full_sft"]  # the same drop on every example: no spread
    assert (shifted["estimate"], shifted["low"], shifted["high"]) == (
        pytest.approx(-0.3, abs=1e-12),) * 3
    assert shifted["verdict"] == "worse"
    assert shifted["note"] == "one seed: interval over examples only"
    noisy = rows[f"forgetting_drop_{NOISY}"]
    v = forget[0, NOISY]
    a = next(iter(v["after_ab"]))
    per_example = v["after_ab"][a] - v["after_a"][a]
    assert noisy["estimate"] == pytest.approx(per_example.mean(), abs=1e-12)
    # Float64 reference: the 95% interval of a mean of n examples is about 2 x 1.96 x sd/sqrt(n)
    # wide (normal approximation; 2000 replicates put about 3% of noise on the width).
    width = 2 * 1.96 * per_example.std() / np.sqrt(per_example.size)
    assert noisy["high"] - noisy["low"] == pytest.approx(width, rel=0.15)
    assert (noisy["low"] + noisy["high"]) / 2 == pytest.approx(noisy["estimate"], abs=0.1 * width)


def test_analyse_cell_without_merges_or_second_seed_says_why(tmp_path):
    from cpift_jax.benchmark import regime_map

    cell, _, _ = _fabricated_cell(tmp_path, merges=())
    cell.config.seeds = (0,)
    rows = {r["comparison"]: r for r in regime_map.analyse_cell(cell, resamples=50)}
    for name in ("cpift_minus_best_merge", "best_merge_minus_experts"):
        assert rows[name]["verdict"] == "not run"
        assert "no applicable merge-only operator" in rows[name]["note"]
    assert rows["cpift_minus_multitask_sft"]["verdict"] != "not run"
    off, _, _ = _fabricated_cell(tmp_path / "off", merges=())
    off.config.forgetting.enabled = False  # before its workdir records the config
    rows = {r["comparison"]: r for r in regime_map.analyse_cell(off, resamples=50)}
    for name in regime_map.COMPARISONS:
        if name.startswith("forgetting_"):
            assert (rows[name]["verdict"], rows[name]["note"]) == (
                "not run", "forgetting not enabled in this cell")


def test_forgetting_without_per_example_values_falls_back_to_seeds(tmp_path):
    import numpy as np

    from cpift_jax.benchmark import regime_map

    cell, _, forget = _fabricated_cell(tmp_path, forgetting_examples=False)
    rows = {r["comparison"]: r for r in regime_map.analyse_cell(cell, resamples=300)}
    drop = rows["forgetting_drop_full_sft"]  # from the stored drops: -0.3 and -0.5
    assert drop["estimate"] == pytest.approx(-0.4)
    assert (drop["low"], drop["high"], drop["verdict"]) == (pytest.approx(-0.5),
                                                            pytest.approx(-0.3), "worse")
    assert drop["note"] == "interval over 2 seeds only (no per-example forgetting scores)"
    noisy, seeds_only = rows[f"forgetting_drop_{NOISY}"], _drops(forget, NOISY)
    assert (noisy["low"], noisy["high"]) == (pytest.approx(min(seeds_only)),
                                             pytest.approx(max(seeds_only)))
    diff = rows["forgetting_cpift_minus_full_sft"]
    per_seed = np.subtract(_drops(forget, "cpift"), _drops(forget, "full_sft"))
    assert diff["estimate"] == pytest.approx(per_seed.mean()) and diff["verdict"] == "better"

    one_seed, _, _ = _fabricated_cell(tmp_path / "one", forgetting_examples=False)
    one_seed.config.seeds = (0,)  # one seed and no examples: the estimates, no interval
    rows = {r["comparison"]: r for r in regime_map.analyse_cell(one_seed, resamples=50)}
    one = rows["forgetting_drop_full_sft"]
    assert one["estimate"] == pytest.approx(-0.3) and one["verdict"] == "undefined"
    assert one["note"] == "one seed: no interval"


def _row(cell, knobs, comparison, estimate, low, high, a="cpift", b="multitask_sft"):
    from cpift_jax.benchmark import statistics
    return {"cell": cell, "knobs": knobs, "comparison": comparison, "a": a, "b": b,
            "estimate": estimate, "low": low, "high": high, "confidence": 0.95,
            "resamples": 100, "verdict": statistics.verdict(low, high), "note": ""}


def _fabricated_rows():
    nan = float("nan")
    return [
        _row("p=0.01,tau=0", {"p": 0.01, "tau": 0}, "cpift_minus_multitask_sft", 0.2, 0.1, 0.3),
        _row("p=0.01,tau=0.5", {"p": 0.01, "tau": 0.5}, "cpift_minus_multitask_sft", -0.05, -0.1,
             0.02),
        _row("p=0.1,tau=0", {"p": 0.1, "tau": 0}, "cpift_minus_multitask_sft", -0.3, -0.4, -0.2),
        # p=0.1,tau=0.5 has no row: grey, n/a
        _row("p=0.01,tau=0", {"p": 0.01, "tau": 0}, "cpift_minus_best_merge", 0.1, nan, nan,
             b="merge_ties"),
    ]


def test_grid_of_puts_knob1_on_x_knob2_on_y_and_marks_intervals():
    import numpy as np

    from cpift_jax.benchmark import regime_map

    axes = [("p", [0.01, 0.1]), ("tau", [0, 0.5])]
    estimate, labels = regime_map.grid_of(_fabricated_rows(), axes, "cpift_minus_multitask_sft")
    np.testing.assert_array_equal(estimate, [[0.2, -0.3], [-0.05, np.nan]])
    assert labels == [["+0.20*", "-0.30*"], ["-0.05", "n/a"]]
    estimate, labels = regime_map.grid_of(_fabricated_rows(), axes, "cpift_minus_best_merge")
    assert labels[0][0] == "+0.10\nties"  # no interval: no star; the operator is named
    one, labels = regime_map.grid_of(_fabricated_rows()[:1], [("p", [0.01, 0.1])],
                                     "cpift_minus_multitask_sft")
    assert one.shape == (1, 2) and labels == [["+0.20*", "n/a"]]


def test_write_renders_the_table_json_and_heat_maps(tmp_path):
    import json

    from matplotlib import image

    from cpift_jax.benchmark import regime_map

    axes = [("p", [0.01, 0.1]), ("tau", [0, 0.5])]
    paths = regime_map.write(tmp_path, _fabricated_rows(), axes)
    assert set(paths["plots"]) == {"cpift_minus_multitask_sft", "cpift_minus_best_merge"}
    for path in paths["plots"].values():
        assert image.imread(path).shape[2] in (3, 4)  # a real PNG
    data = json.loads((tmp_path / "regime_map.json").read_text())  # strict JSON: NaN is null
    assert data["axes"] == [["p", [0.01, 0.1]], ["tau", [0, 0.5]]]
    assert data["rows"][3]["low"] is None and data["rows"][0]["verdict"] == "better"
    md = (tmp_path / "regime_map.md").read_text()
    assert "| p=0.01,tau=0 | 0.01 | 0 | cpift | multitask_sft | +0.200 * | 95%: [+0.100, +0.300] " \
           "| better |" in md
    assert "| p=0.01,tau=0.5 | 0.01 | 0.5 | cpift | multitask_sft | -0.050 | " \
           "95%: [-0.100, +0.020] | not distinguishable |" in md
    assert "| +0.100 | n/a | undefined |" in md


# ------------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_binary_runs_a_2x2_grid_on_the_smoke_config(tmp_path):
    import json

    root = tmp_path / "grid"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device is enough
    command = [sys.executable, "-m", "experiments.sweep", "--config=configs/toy.py:smoke",
               "--config.merge_only.enabled=True",
               "--config.merge_only.operators=('linear','task_arithmetic')",
               "--knob=tau", "--values=0,0.5", "--knob2=suite.imbalance", "--values2=1,4",
               "--resamples=200", f"--workdir={root}"]
    proc = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ["tau=0,suite.imbalance=1", "tau=0,suite.imbalance=4", "tau=0.5,suite.imbalance=1",
             "tau=0.5,suite.imbalance=4"]
    for name in names:
        config = json.loads((root / name / "config.json").read_text())
        assert (config["cpift"]["tau"], config["suite"]["imbalance"]) == tuple(
            float(v.split("=")[1]) for v in name.split(","))
        assert (root / name / "results.md").exists()
    data = json.loads((root / "regime_map.json").read_text())
    by = {(r["cell"], r["comparison"]): r for r in data["rows"]}
    assert {c for c, _ in by} == set(names)
    for name in names:
        r = by[name, "cpift_minus_best_merge"]
        assert r["b"] in ("merge_linear", "merge_task_arithmetic")
        assert r["verdict"] in ("better", "worse", "not distinguishable", "undefined")
        drop = by[name, "forgetting_drop_cpift"]  # one seed: an interval over examples
        assert drop["note"] == "one seed: interval over examples only"
        assert drop["low"] is not None and drop["verdict"] in ("better", "worse",
                                                               "not distinguishable")
    for comparison in ("cpift_minus_multitask_sft", "cpift_minus_best_merge",
                       "best_merge_minus_experts", "forgetting_cpift_minus_full_sft"):
        assert (root / "plots" / f"{comparison}.png").stat().st_size > 0
    assert "## CPI-FT minus full multi-task SFT" in (root / "regime_map.md").read_text()
    assert "## CPI-FT minus full multi-task SFT" in proc.stdout
