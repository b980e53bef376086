"""Tests for cpift_jax.benchmark.aggregate (Results, collect), report, plots and the
experiments.report binary.

A synthetic results.json (3 tasks, 3 seeds) with hand-picked numbers: the expected cells are
written out, so a change in formatting, bolding or row order fails here.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import toy
from cpift_jax.benchmark import aggregate, plots, report
from cpift_jax.benchmark.aggregate import Results
from cpift_jax.benchmark.workdir import Workdir

REPO = Path(__file__).resolve().parents[1]
TASKS = ["arith", "logic", "recall"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _method(label, block, budget, scores, avg, per_seed_avg):
    """scores: {task: (mean, std)}; avg: (mean, std); per_seed_avg: one value per seed."""
    return {
        "label": label, "block": block, "budget": budget, "status": "ok",
        "per_task": {t: {"mean": m, "std": s} for t, (m, s) in scores.items()},
        "avg_normalized": {"mean": avg[0], "std": avg[1]},
        "per_seed": [{"seed": seed, "per_task": {t: m for t, (m, _) in scores.items()},
                      "avg_normalized": a} for seed, a in zip([0, 1, 2], per_seed_avg)],
    }


def _interval(estimate, low, high, resamples=2000):
    from cpift_jax.benchmark.statistics import Interval
    return Interval(estimate, low, high, 0.95, resamples).to_json()


def _pair(a, b, block, estimate, low, high, per_seed):
    return {"a": a, "b": b, "block": block, "interval": _interval(estimate, low, high),
            "per_seed": per_seed}


def _raw() -> dict:
    """The results.json layout (Results.to_json) of a full run."""
    methods = {
        # Inserted out of the paper's order on purpose: the table must reorder them.
        "cpift": _method("CPI-FT", "main", "3 stages x 200 steps x 16 seqs",
                         {"arith": (0.88, 0.01), "logic": (0.55, 0.05), "recall": (0.65, 0.02)},
                         (0.81, 0.03), [0.78, 0.81, 0.84]),
        "single_task": _method("Single-task experts", "main", "400 steps x 16 seqs per task",
                               {"arith": (0.90, 0.01), "logic": (0.80, 0.02),
                                "recall": (0.75, 0.03)}, (1.0, 0.0), [1.0, 1.0, 1.0]),
        "my_extra": {**_method("Extra baseline", "main", "100 steps",
                               {"arith": (0.10, 0.0), "logic": (0.10, 0.0),
                                "recall": (0.10, 0.0)}, (0.10, 0.0), [0.1, 0.1, 0.1])},
        "fused_only": _method("Fused only", "main", "no training after fusion",
                              {"arith": (0.40, 0.10), "logic": (0.62, 0.03),
                               "recall": (0.30, 0.05)}, (0.45, 0.06), [0.4, 0.45, 0.5]),
        "multitask_sft": _method("Full multi-task SFT", "main", "1200 steps x 16 seqs",
                                 {"arith": (0.85, 0.02), "logic": (0.60, 0.04),
                                  "recall": (0.72, 0.01)}, (0.85, 0.02), [0.83, 0.85, 0.87]),
        "ablation_tau0": _method("tau = 0 (one group)", "ablation", "as CPI-FT",
                                 {"arith": (0.70, 0.02), "logic": (0.50, 0.02),
                                  "recall": (0.60, 0.02)}, (0.70, 0.02), [0.7, 0.7, 0.7]),
        "ablation_linear": _method("Linear instead of SLERP", "ablation", "as CPI-FT",
                                   {"arith": (0.75, 0.02), "logic": (0.45, 0.02),
                                    "recall": (0.58, 0.02)}, (0.72, 0.02), [0.7, 0.72, 0.74]),
        "merge_ties": _method("TIES", "merge_only", "no training",
                              {"arith": (0.30, 0.01), "logic": (0.20, 0.01),
                               "recall": (0.25, 0.01)}, (0.30, 0.01), [0.3, 0.3, 0.3]),
        "merge_dare": _method("DARE", "merge_only", "no training",
                              {"arith": (0.32, 0.01), "logic": (0.18, 0.01),
                               "recall": (0.22, 0.01)}, (0.28, 0.01), [0.28, 0.28, 0.28]),
    }
    overlap = [[1.0, 0.25, 0.05], [0.25, 1.0, 0.08], [0.05, 0.08, 1.0]]
    layers = {"embed": 0.02, "0": 0.012, "1": 0.008, "final_norm": 0.0, "head": 0.015}
    kinds = {"embed": 0.02, "q_proj": 0.011, "k_proj": 0.009, "v_proj": 0.01, "o_proj": 0.01,
             "gate_proj": 0.012, "up_proj": 0.01, "down_proj": 0.009, "norm": 0.0, "head": 0.015}
    return {
        "format": aggregate.FORMAT,
        # A decoy "p" elsewhere in the config: the report reads the stored core_fraction only.
        "config": {"cpift": {"p": 0.01, "tau": 0.1}, "optimizer": {"p": 0.5}, "seeds": 3},
        "core_fraction": 0.01,
        "timings": {"total_s": 754.3, "stages": {"probe": 120.0, "fusion": 4.25}},
        "seeds": [0, 1, 2],
        "tasks": list(TASKS),
        "chance": {"arith": 0.065, "logic": 0.043, "recall": 0.001},
        "normalization": "per task (score - chance) / (expert - chance), averaged over tasks.",
        "methods": methods,
        "forgetting": {"pair": ["arith", "logic"], "methods": {
            "multitask_sft": {"label": "Full SFT", "drop_a": {"mean": -0.245, "std": 0.03},
                              "gain_b": {"mean": 0.134, "std": 0.02}},
            "multistage_random": {"label": "Multi-stage", "drop_a": {"mean": -0.162, "std": 0.04},
                                  "gain_b": {"mean": 0.126, "std": 0.03}},
            "cpift": {"label": "CPI-FT", "drop_a": {"mean": -0.057, "std": 0.01},
                      "gain_b": {"mean": 0.122, "std": 0.02}}}},
        "overlap": {"tasks": list(TASKS), "matrix": overlap, "per_seed": [overlap] * 3},
        "groups": {"per_seed": [[["arith", "logic"], ["recall"]], [["recall"], ["arith", "logic"]],
                                [["arith"], ["logic"], ["recall"]]]},
        "core_density": {t: {"by_layer": dict(layers), "by_kind": dict(kinds)} for t in TASKS},
        "comparisons": {
            "statistic": "difference of the normalised average (A - B)", "resamples": 2000,
            "confidence": 0.95, "examples": {t: 200 for t in TASKS},
            "pairs": [
                _pair("cpift", "single_task", "main", -0.19, -0.25, -0.13, [-0.22, -0.19, -0.16]),
                _pair("cpift", "multitask_sft", "main", -0.04, -0.07, -0.01, [-0.05, -0.04, -0.03]),
                _pair("ablation_tau0", "cpift", "ablation", -0.11, -0.2, 0.01,
                      [-0.08, -0.11, -0.14]),
                _pair("merge_ties", "single_task", "merge_only", -0.7, -0.75, -0.65,
                      [-0.7, -0.7, -0.7])]},
    }


def _results() -> Results:
    return Results.from_json(_raw())


def _section(markdown: str, title: str) -> str:
    """The text of the '## title...' section up to the next '## '."""
    start = markdown.index("## " + title)
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end != -1 else None]


def _row(markdown: str, label: str, title: str) -> str:
    rows = [line for line in _section(markdown, title).splitlines()
            if line.startswith(f"| {label} |")]
    assert len(rows) == 1, (label, rows)
    return rows[0]


def test_main_table_cells_bold_and_order():
    md = report.render_markdown(_results())
    main = "Main methods"
    assert _row(md, "CPI-FT", main) == (
        "| CPI-FT | **88.0 ± 1.0** | 55.0 ± 5.0 | 65.0 ± 2.0 | 0.81 ± 0.03 "
        "| 3 stages x 200 steps x 16 seqs |")
    # The experts are the reference: higher on every column, never bold.
    assert _row(md, "Single-task experts", main) == (
        "| Single-task experts | 90.0 ± 1.0 | 80.0 ± 2.0 | 75.0 ± 3.0 | 1.00 ± 0.00 "
        "| 400 steps x 16 seqs per task |")
    assert _row(md, "Full multi-task SFT", main) == (
        "| Full multi-task SFT | 85.0 ± 2.0 | 60.0 ± 4.0 | **72.0 ± 1.0** | **0.85 ± 0.02** "
        "| 1200 steps x 16 seqs |")
    assert _row(md, "Fused only", main).startswith("| Fused only | 40.0 ± 10.0 | **62.0 ± 3.0** |")
    header = _section(md, main).splitlines()[2]
    assert header == "| Method | arith | logic | recall | Avg. norm. | Budget |"
    # Paper order first (single_task, multitask_sft, fused_only, cpift), then other main keys.
    section = _section(md, main)
    positions = [section.index(f"| {label} |") for label in
                 ("Single-task experts", "Full multi-task SFT", "Fused only", "CPI-FT",
                  "Extra baseline")]
    assert positions == sorted(positions)
    assert "TIES" not in section and "tau = 0" not in section


def test_ablation_and_merge_blocks_are_separate_tables_with_bold():
    md = report.render_markdown(_results())
    assert _row(md, "Linear instead of SLERP", "Ablations") == (
        "| Linear instead of SLERP | **75.0 ± 2.0** | 45.0 ± 2.0 | 58.0 ± 2.0 | **0.72 ± 0.02** "
        "| as CPI-FT |")
    assert _row(md, "tau = 0 (one group)", "Ablations").startswith(
        "| tau = 0 (one group) | 70.0 ± 2.0 | **50.0 ± 2.0** | **60.0 ± 2.0** | 0.70 ± 0.02 |")
    assert _row(md, "DARE", "Merge only") == (
        "| DARE | **32.0 ± 1.0** | 18.0 ± 1.0 | 22.0 ± 1.0 | 0.28 ± 0.01 | no training |")
    assert "CPI-FT |" not in _section(md, "Merge only")


def test_forgetting_overlap_groups_density_and_setup():
    md = report.render_markdown(_results())
    forgetting = _section(md, "Forgetting")
    assert "| Method | Drop on A (arith) | Gain on B (logic) |" in forgetting
    assert "| Full SFT | -24.5 ± 3.0 | **+13.4 ± 2.0** |" in forgetting
    assert "| CPI-FT | **-5.7 ± 1.0** | +12.2 ± 2.0 |" in forgetting
    overlap = _section(md, "Core overlap")
    assert "| arith | 1.000 | 0.250 | 0.050 |" in overlap
    assert "- seed 0: {arith, logic} → {recall} (2 groups)" in overlap
    assert "- seed 2: {arith} → {logic} → {recall} (3 groups)" in overlap
    density = _section(md, "Core density")
    assert "core fraction p = 1.0%" in density
    assert "| arith | 2.00 | 1.20 | 0.80 | 0.00 | 1.50 |" in density
    setup = _section(md, "Set-up")
    assert "- Normalisation: per task (score - chance) / (expert - chance)" in setup
    assert "- Seeds: 0, 1, 2 (3)" in setup
    assert "arith 6.5%, logic 4.3%, recall 0.1%" in setup
    assert "- Total time: 754.3 s (12.6 min)" in setup
    assert "| probe | 120.0 s (2.0 min) |" in setup and "| fusion | 4.2 s |" in setup
    assert "(not run)" not in md


def _with_pair(estimate, low, high, per_seed=None) -> Results:
    """``_raw()`` with the CPI-FT minus multi-task SFT interval replaced; ``per_seed``:
    ``{method: [avg_normalized per seed]}``."""
    raw = _raw()
    raw["comparisons"]["pairs"][1]["interval"] = _interval(estimate, low, high)
    for key, values in (per_seed or {}).items():
        for row, value in zip(raw["methods"][key]["per_seed"], values):
            row["avg_normalized"] = value
    return Results.from_json(raw)


def test_verdict_is_worded_from_the_interval():
    assert report.verdict(_results()) == (
        "CPI-FT is worse than full multi-task SFT on the normalised average: difference -0.04 "
        "[95% CI -0.07, -0.01], 3 seeds x 200 examples per task; CPI-FT is higher on 0 of 3 "
        "seeds.")
    higher = _with_pair(0.12, 0.03, 0.21, {"cpift": [0.9, 0.91, 0.84],
                                          "multitask_sft": [0.85, 0.85, 0.85]})
    assert report.verdict(higher) == (
        "CPI-FT is better than full multi-task SFT on the normalised average: difference +0.12 "
        "[95% CI +0.03, +0.21], 3 seeds x 200 examples per task; CPI-FT is higher on 2 of 3 "
        "seeds.")
    assert ("CPI-FT is not distinguishable from full multi-task SFT on the normalised average: "
            "difference +0.01 [95% CI -0.02, +0.04]") in report.verdict(
        _with_pair(0.01, -0.02, 0.04))
    # An interval that touches 0 does not exclude it.
    assert "not distinguishable from" in report.verdict(_with_pair(0.05, 0.0, 0.1))
    assert report.verdict(_with_pair(0.05, float("nan"), 0.1)) == (
        "no verdict: the difference of the normalised averages of 'cpift' and 'multitask_sft' or "
        "its interval is undefined (NaN: on some seed or bootstrap replicate no task's expert "
        "beat its floor (chance or the base model) by 0.05; see Set-up)")
    # The verdict is also the report's first section.
    assert report.verdict(_results()) in _section(report.render_markdown(_results()), "Verdict")


def test_an_older_results_json_without_statistics_loads_and_says_how_to_get_them():
    raw = _raw()
    del raw["comparisons"]
    results = Results.from_json(raw)
    assert results.comparisons is None and results.to_json() == raw
    md = report.render_markdown(results)
    assert report.verdict(results).startswith(
        "no verdict: this results.json has no paired comparison of 'cpift' and 'multitask_sft'")
    assert "delete <workdir>/results/DONE.json" in _section(md, "Paired comparisons")
    assert "mean ± std over 3 seeds" in _section(md, "Main methods")  # no standard errors


def test_paired_comparisons_table():
    section = _section(report.render_markdown(_results()), "Paired comparisons")
    assert "| Comparison (A − B) | Difference | 95% CI | Verdict | Per seed |" in section
    assert ("| CPI-FT − Full multi-task SFT | -0.04 | [-0.07, -0.01] | worse "
            "| -0.05, -0.04, -0.03 |") in section
    assert ("| tau = 0 (one group) − CPI-FT | -0.11 | [-0.20, +0.01] | not distinguishable "
            "| -0.08, -0.11, -0.14 |") in section
    assert "| TIES − Single-task experts | -0.70 | [-0.75, -0.65] | worse |" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and "−" in line]
    assert len(rows) == 5  # header + the 4 pairs, in the stored order
    assert rows[1].startswith("| CPI-FT − Single-task experts |")
    assert "2000 bootstrap resamples; 3 seeds x 200 examples per task" in section
    empty = _raw()
    empty["comparisons"]["pairs"] = []
    assert "(not run): no pair to compare" in report.render_markdown(Results.from_json(empty))


def test_cells_show_the_standard_error_when_every_row_has_one():
    raw = _raw()
    for m in raw["methods"].values():
        for s in [*m["per_task"].values(), m["avg_normalized"]]:
            s["se"] = s["std"] / 2
    results = Results.from_json(raw)
    assert results.methods["cpift"].per_task["arith"].se == 0.005
    assert results.to_json() == raw
    md = report.render_markdown(results)
    assert _row(md, "CPI-FT", "Main methods") == (
        "| CPI-FT | **88.0 ± 0.5** | 55.0 ± 2.5 | 65.0 ± 1.0 | 0.81 ± 0.01 "
        "| 3 stages x 200 steps x 16 seqs |")
    assert ("mean over 3 seeds ± standard error (over seeds and held-out examples: two-level "
            "bootstrap)") in _section(md, "Main methods")
    del raw["methods"]["merge_ties"]["per_task"]["logic"]["se"]  # one missing: std everywhere
    md = report.render_markdown(Results.from_json(raw))
    assert "| CPI-FT | **88.0 ± 1.0** |" in md and "mean ± std over 3 seeds" in md


def test_forgetting_with_intervals():
    raw = _raw()
    intervals = {"multitask_sft": ((-0.245, -0.30, -0.19), (0.134, 0.10, 0.17)),
                 "multistage_random": ((-0.162, -0.2, -0.12), (0.126, 0.09, 0.16)),
                 "cpift": ((-0.057, -0.09, -0.02), (0.122, 0.08, 0.16))}
    for k, (drop, gain) in intervals.items():
        raw["forgetting"]["methods"][k]["drop_a_interval"] = _interval(*drop)
        raw["forgetting"]["methods"][k]["gain_b_interval"] = _interval(*gain)
    results = Results.from_json(raw)
    assert results.forgetting.methods["cpift"].drop_a_interval.high == -0.02
    assert results.to_json() == raw
    section = _section(report.render_markdown(results), "Forgetting")
    assert "| Full SFT | -24.5 [-30.0, -19.0] | **+13.4 [+10.0, +17.0]** |" in section
    assert "| CPI-FT | **-5.7 [-9.0, -2.0]** | +12.2 [+8.0, +16.0] |" in section
    assert ("Percentage points, mean over seeds [95% CI: paired two-level bootstrap over seeds "
            "and held-out examples, 2000 resamples]") in section


def _main_only() -> dict:
    """A partial run: main methods only, no ablations, merges, forgetting, overlap or density."""
    raw = _raw()
    for key in ("overlap", "core_density", "forgetting", "groups"):
        del raw[key]
    for key in ("ablation_tau0", "ablation_linear", "merge_ties", "merge_dare"):
        del raw["methods"][key]
    raw["comparisons"]["pairs"] = [p for p in raw["comparisons"]["pairs"] if p["block"] == "main"]
    return raw


def test_missing_sections_say_not_run():
    raw = _main_only()
    del raw["timings"]
    md = report.render_markdown(Results.from_json(raw))
    for title in ("Ablations", "Merge only", "Forgetting"):
        assert _section(md, title).strip().endswith("(not run)"), title
    assert "Overlap matrix: (not run)" in md and "Groups: (not run)" in md
    assert _section(md, "Core density").strip().endswith("(not run)")
    assert "- Timings: (not run)" in md
    assert "| CPI-FT | **88.0 ± 1.0**" in md  # what is present still renders

    raw["methods"], raw["comparisons"]["pairs"] = {}, []
    md = report.render_markdown(Results.from_json(raw))
    assert _section(md, "Main methods").strip().endswith("(not run)")
    assert "(not run): needs both 'cpift' and 'multitask_sft'" in _section(md, "Verdict")


def _broken(edit) -> dict:
    raw = _raw()
    edit(raw)
    return raw


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["methods"]["cpift"]["per_task"].pop("logic"),
     r"results\['methods'\]\['cpift'\]\['per_task'\] is missing task\(s\) \['logic'\] and "
     r"has task\(s\) not in results\['tasks'\] \[\]"),
    (lambda r: r["overlap"].update(matrix=[[1.0, 0.2], [0.2, 1.0], [0.1, 0.1]]),
     r"results\['overlap'\]\['matrix'\] must be a square 3x3 matrix"),
    (lambda r: r["methods"]["merge_ties"].update(block="merges"),
     r"results\['methods'\]\['merge_ties'\]\['block'\] is 'merges'"),
    (lambda r: r["methods"]["merge_ties"].update(status="error"),
     r"results\['methods'\]\['merge_ties'\]\['status'\] is 'error'"),
    (lambda r: r["forgetting"]["methods"]["cpift"].update(drop_a={"std": 0.1}),
     r"results\['forgetting'\]\['methods'\]\['cpift'\]\['drop_a'\] has no 'mean'"),
    (lambda r: r["methods"]["cpift"]["per_seed"][1]["per_task"].update(arith="high"),
     r"results\['methods'\]\['cpift'\]\['per_seed'\]\[1\]\['per_task'\]\['arith'\] must be a "
     "number, got 'high'"),
    (lambda r: r.pop("core_fraction"), r"results has no 'core_fraction'"),
    (lambda r: r.update(core_fraction=1.5), r"results\['core_fraction'\] must be in \(0, 1\]"),
    (lambda r: r["comparisons"]["pairs"][1]["interval"].update(verdict="better"),
     r"results\['comparisons'\]\['pairs'\]\[1\]\['interval'\]\['verdict'\] is 'better' but the "
     r"interval \[-0.07, -0.01\] gives 'worse'"),
    (lambda r: r["comparisons"]["pairs"][0].update(b="nonesuch"),
     r"results\['comparisons'\]\['pairs'\]\[0\]\['b'\] is 'nonesuch', not a method"),
    (lambda r: r["comparisons"]["examples"].pop("recall"),
     r"results\['comparisons'\]\['examples'\] must name every task"),
    (lambda r: r["methods"]["cpift"]["per_task"]["arith"].update(se="small"),
     r"results\['methods'\]\['cpift'\]\['per_task'\]\['arith'\]\['se'\] must be a number"),
])
def test_malformed_results_json_names_the_file_and_key(tmp_path, edit, message):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_broken(edit)))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {message}"):
        Results.load(path)
    with pytest.raises(ValueError, match=message):
        report.rerender(tmp_path)
    assert not (tmp_path / "results.md").exists()  # nothing half-written


def test_a_file_of_an_older_format_is_refused_with_the_way_out(tmp_path):
    old = _raw()
    del old["format"], old["core_fraction"]  # the layout before the Results dataclass
    (tmp_path / "results.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"results.json: results has format '\(none\)', "
                                         r"expected 2: .*delete <workdir>/results/DONE.json"):
        report.rerender(tmp_path)


def test_round_trip_and_plots_need_their_section(tmp_path):
    assert _results().to_json() == _raw()
    _results().save(tmp_path / "results.json")
    assert Results.load(tmp_path / "results.json") == _results()
    results = Results.from_json(_main_only())
    with pytest.raises(ValueError, match="no 'overlap' section"):
        plots.overlap_heatmap(results, tmp_path / "o.png")
    with pytest.raises(ValueError, match="no scored method in block 'ablation'"):
        plots.scores_by_method(results, tmp_path / "s.png", block="ablation")
    raw = _main_only()
    del raw["comparisons"]
    with pytest.raises(ValueError, match="no 'comparisons' section"):
        plots.paired_differences(Results.from_json(raw), tmp_path / "p.png")


def test_core_fraction_is_the_stored_field_not_a_config_key():
    raw = _raw()
    raw["core_fraction"] = 0.05  # the config still says cpift.p = 0.01 (and optimizer.p = 0.5)
    density = _section(report.render_markdown(Results.from_json(raw)), "Core density")
    assert "core fraction p = 5.0%" in density


def test_not_applicable_rows_show_their_reason_and_draw_no_bars(tmp_path):
    raw = _raw()
    raw["methods"]["merge_dare"] = {"label": "DARE", "block": "merge_only",
                                    "budget": "no training", "status": "not_applicable",
                                    "reason": "needs a base model"}
    results = Results.from_json(raw)
    assert results.to_json() == raw
    md = report.render_markdown(results)
    assert _row(md, "DARE", "Merge only") == (
        "| DARE | n/a (needs a base model) | – | – | – | no training |")
    # TIES is now the only scored merge: nothing to compare with, so nothing bold.
    assert _row(md, "TIES", "Merge only") == (
        "| TIES | 30.0 ± 1.0 | 20.0 ± 1.0 | 25.0 ± 1.0 | 0.30 ± 0.01 | no training |")
    raw["methods"]["merge_ties"] = dict(raw["methods"]["merge_dare"], label="TIES")
    paths = report.write(tmp_path, Results.from_json(raw))
    assert str(tmp_path / "plots" / "scores_merge_only.png") not in paths  # no scores to draw
    assert _row((tmp_path / "results.md").read_text(), "TIES", "Merge only").startswith(
        "| TIES | n/a (needs a base model) |")


def _examples(score, n=50):
    """Per-example 0/1 values whose mean is ``score`` (a multiple of 1 / n)."""
    ones = round(score * n)
    assert ones == pytest.approx(score * n)
    return [1.0] * ones + [0.0] * (n - ones)


def _scored(per_task):
    return {"per_task": per_task, "per_example": {t: _examples(v) for t, v in per_task.items()}}


def test_collect_builds_results_from_stage_results(tmp_path):
    """Stage results written through a Workdir as the pipeline's stages would; every
    aggregated number is written out by hand."""
    config = toy.get_config("smoke")
    config.methods = ("single_task", "multitask_sft", "cpift")
    config.seeds = (0, 1)
    config.forgetting.enabled = False
    config.merge_only.enabled = True
    config.merge_only.operators = ("ties", "slerp")
    tasks = ("a", "b")
    chance = {"a": 0.1, "b": 0.5}
    wd = Workdir(tmp_path, {"any": "config"})
    expert = {0: {"a": 0.9, "b": 0.52}, 1: {"a": 0.7, "b": 0.9}}  # seed 0: b's expert at chance
    for s in (0, 1):
        scores = {t: {u: expert[s][u] if u == t else 0.0 for u in tasks} for t in tasks}
        wd.run(f"seed{s}/experts", lambda d, scores=scores: {
            "scores": scores,
            "per_example": {t: {u: _examples(v) for u, v in sc.items()}
                            for t, sc in scores.items()}})
        wd.run(f"seed{s}/multitask_sft", lambda d, s=s: _scored({"a": 0.5, "b": 0.7}))
        wd.run(f"seed{s}/cpift", lambda d, s=s: _scored({"a": 0.3 + 0.2 * s, "b": 0.9}))
        wd.run(f"seed{s}/merge_ties", lambda d: _scored({"a": 0.1, "b": 0.5}))
        wd.run(f"seed{s}/merge_slerp", lambda d: {"status": "not_applicable",
                                                   "reason": "needs exactly 2 models"})
        wd.run(f"seed{s}/clusters", lambda d, s=s: {"overlap": [[1.0, 0.1 * s], [0.1 * s, 1.0]],
                                                    "groups": [["a"], ["b"]]})
        wd.run(f"seed{s}/cores", lambda d: {"density": {
            t: {"by_layer": {"0": 0.05}, "by_kind": {"q_proj": 0.04}} for t in tasks}})
    results = aggregate.collect(config, wd, tasks, chance, labels={
        "single_task": "Experts", "multitask_sft": "Multi", "cpift": "CPI-FT"},
        budgets={"single_task": "S", "multitask_sft": "M", "cpift": "C"}, ablations={},
        forgetting_labels={})

    assert results.core_fraction == config.cpift.p == 0.05
    assert results.seeds == (0, 1) and results.tasks == tasks
    assert list(results.methods) == ["single_task", "multitask_sft", "cpift", "merge_ties",
                                     "merge_slerp"]
    multi = results.methods["multitask_sft"]
    # seed 0: only a counts, (0.5 - 0.1) / (0.9 - 0.1) = 0.5; seed 1: mean of
    # (0.5 - 0.1) / 0.6 = 2/3 and (0.7 - 0.5) / 0.4 = 0.5.
    assert [r.avg_normalized for r in multi.per_seed] == pytest.approx([0.5, 7 / 12])
    assert multi.avg_normalized.mean == pytest.approx((0.5 + 7 / 12) / 2)
    assert multi.avg_normalized.std == pytest.approx((7 / 12 - 0.5) / 2)
    assert results.methods["cpift"].per_task["a"].mean == pytest.approx(0.4)
    assert results.methods["cpift"].per_task["a"].std == pytest.approx(0.1)
    assert results.methods["single_task"].avg_normalized == aggregate.Stat(1.0, 0.0, se=0.0)
    slerp = results.methods["merge_slerp"]
    assert (slerp.status, slerp.reason, slerp.block) == (
        aggregate.NOT_APPLICABLE, "needs exactly 2 models", "merge_only")
    assert results.methods["merge_ties"].applicable
    assert results.overlap.matrix == ((1.0, 0.05), (0.05, 1.0))
    assert results.groups == ((("a",), ("b",)), (("a",), ("b",)))
    assert results.core_density["a"] == aggregate.CoreDensity({"0": 0.05}, {"q_proj": 0.04})
    assert results.forgetting is None and results.timings is None
    # Paired comparisons (normalised as above): cpift is 0.25 on seed 0 (a only) and
    # mean((0.5 - 0.1) / 0.6, (0.9 - 0.5) / 0.4) = 5/6 on seed 1; merge_ties is 0 on both.
    found = results.comparisons
    assert [(p.a, p.b, p.block) for p in found.pairs] == [
        ("cpift", "single_task", "main"), ("cpift", "multitask_sft", "main"),
        ("merge_ties", "cpift", "merge_only"), ("merge_ties", "single_task", "merge_only")]
    assert found.examples == {"a": 50, "b": 50} and found.resamples == 2000
    per_seed = {(p.a, p.b): p.per_seed for p in found.pairs}
    assert per_seed[("cpift", "multitask_sft")] == pytest.approx((0.25 - 0.5, 5 / 6 - 7 / 12))
    assert per_seed[("cpift", "single_task")] == pytest.approx((-0.75, -1 / 6))
    assert per_seed[("merge_ties", "cpift")] == pytest.approx((-0.25, -5 / 6))
    assert per_seed[("merge_ties", "single_task")] == pytest.approx((-1.0, -1.0))
    for p in found.pairs:
        assert p.interval.estimate == pytest.approx(np.mean(p.per_seed))
        assert p.interval.low <= p.interval.estimate <= p.interval.high
    assert found.find("merge_ties", "single_task").verdict == "worse"
    se = results.methods["cpift"].per_task["a"].se
    assert 0 < se < 0.2 and results.methods["multitask_sft"].avg_normalized.se > 0
    assert results.methods["merge_slerp"].per_task == {}
    results.save(tmp_path / "results.json")
    assert Results.load(tmp_path / "results.json") == results
    assert aggregate.timings(wd).stages["seed1/cpift"] >= 0


def _check_png(path: Path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 10_000, (path, len(data))
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 200, (path, pixels.shape)
    assert float(np.std(pixels[..., :3])) > 0.05, f"{path} looks blank"


def test_write_plots_and_links(tmp_path):
    results = _results()
    paths = report.write(tmp_path, results)
    names = sorted(Path(p).name for p in paths)
    assert names == ["core_density.png", "overlap.png", "paired_differences.png", "results.md",
                     "scores_ablation.png", "scores_main.png", "scores_merge_only.png"]
    for p in paths[1:]:
        assert Path(p).parent == tmp_path / "plots"
        _check_png(Path(p))
    md = (tmp_path / "results.md").read_text()
    assert "![Core overlap (Jaccard)](plots/overlap.png)" in md
    assert "![Per-task scores, main methods](plots/scores_main.png)" in md
    assert "![Per-task scores, merge only](plots/scores_merge_only.png)" in md
    assert "![Core density](plots/core_density.png)" in md
    assert ("![Paired differences of the normalised average](plots/paired_differences.png)"
            in _section(md, "Paired comparisons"))


def test_write_partial_run_draws_only_what_is_present(tmp_path):
    paths = report.write(tmp_path, Results.from_json(_main_only()))
    assert paths == [str(tmp_path / "results.md"), str(tmp_path / "plots" / "scores_main.png"),
                     str(tmp_path / "plots" / "paired_differences.png")]
    md = (tmp_path / "results.md").read_text()
    assert "![Per-task scores, main methods](plots/scores_main.png)" in md
    assert "plots/overlap.png" not in md and "plots/scores_ablation.png" not in md
    assert _section(md, "Ablations").strip().endswith("(not run)")


def _run_binary(workdir: Path):
    return subprocess.run([sys.executable, "-m", "experiments.report", f"--workdir={workdir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_binary_rerenders_from_results_json(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_main_only()))
    proc = _run_binary(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(tmp_path / "results.md"),
                                   str(tmp_path / "plots" / "scores_main.png"),
                                   str(tmp_path / "plots" / "paired_differences.png")]
    assert (tmp_path / "results.md").read_text() == report.render_markdown(
        Results.from_json(_main_only()), {"scores_main": "plots/scores_main.png",
                                          "paired_differences": "plots/paired_differences.png"})
    _check_png(tmp_path / "plots" / "scores_main.png")


@pytest.mark.slow
def test_binary_without_results_json_fails_clearly(tmp_path):
    proc = _run_binary(tmp_path)
    assert proc.returncode != 0
    assert f"no results.json in workdir {tmp_path}" in proc.stderr
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted JSON artifact"):
        report.rerender(tmp_path)
