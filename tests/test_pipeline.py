"""The CPI-FT benchmark pipeline: end to end on configs/toy.py:smoke, budgets, normalisation,
bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import toy
from cpift_jax.benchmark import aggregate
from cpift_jax.benchmark import methods
from cpift_jax.benchmark import pipeline
from cpift_jax.benchmark import config_checks

ROOT = Path(__file__).resolve().parents[1]


def _smoke():
    return toy.get_config("smoke")


def _markers(workdir: Path) -> dict[str, int]:
    return {str(p.parent.relative_to(workdir)): p.stat().st_mtime_ns
            for p in workdir.rglob("DONE.json") if ".partial-" not in str(p)}


# ------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke") / "wd"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device is enough
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cpift", "--config=configs/toy.py:smoke",
         f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("results.md")
    return workdir


@pytest.mark.slow
def test_binary_writes_the_schema(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    assert list(results["methods"]) == list(pipeline.MAIN_METHODS)
    assert results["tasks"] == list(_smoke().suite.tasks)
    assert results["seeds"] == [0]
    for key, m in results["methods"].items():
        assert m["block"] == "main" and m["label"] and m["budget"]
        assert set(m["per_task"]) == set(results["tasks"])
        assert len(m["per_seed"]) == 1 and m["per_seed"][0]["seed"] == 0
    assert set(results["forgetting"]["methods"]) == {"full_sft", "multistage", "cpift"}
    n = len(results["tasks"])
    assert np.asarray(results["overlap"]["matrix"]).shape == (n, n)
    assert sorted(t for g in results["groups"]["per_seed"][0] for t in g) == sorted(results["tasks"])
    assert set(results["core_density"]) == set(results["tasks"])
    assert results["timings"]["total_s"] > 0
    assert (smoke_run / "results.md").exists()


@pytest.mark.slow
def test_rerun_skips_every_stage_and_resumes_only_a_deleted_one(smoke_run):
    before = _markers(smoke_run)
    first = json.loads((smoke_run / "results.json").read_text())
    again = pipeline.run(_smoke(), smoke_run)
    assert _markers(smoke_run) == before  # nothing recomputed
    assert again.to_json()["methods"] == first["methods"]

    (smoke_run / "results" / "DONE.json").unlink()
    pipeline.run(_smoke(), smoke_run)
    after = _markers(smoke_run)
    changed = sorted(k for k in after if after[k] != before.get(k))
    assert changed == ["results"]
    assert (smoke_run / "results.partial-0").exists()  # the old one is kept, not overwritten


@pytest.mark.slow
def test_a_different_config_is_refused_naming_the_key(smoke_run):
    config = _smoke()
    config.cpift.tau = 0.3
    with pytest.raises(ValueError, match="cpift.tau"):
        pipeline.run(config, smoke_run)


@pytest.mark.slow
def test_a_corrupted_artifact_gives_a_clear_error(smoke_run, tmp_path):
    import shutil
    copy = tmp_path / "wd"
    shutil.copytree(smoke_run, copy)
    (copy / "seed0" / "clusters" / "DONE.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupted JSON artifact .*clusters"):
        pipeline.run(_smoke(), copy)
    # A damaged parameter checkpoint that a stage must read again.
    shutil.rmtree(copy / "seed0" / "experts" / "arith")
    (copy / "seed0" / "experts" / "arith").mkdir()
    (copy / "seed0" / "clusters" / "DONE.json").unlink()
    (copy / "seed0" / "cores" / "DONE.json").unlink()
    with pytest.raises(ValueError, match="cannot read the parameter checkpoint .*arith"):
        pipeline.run(_smoke(), copy)


@pytest.mark.slow
def test_base_checkpoint_that_does_not_match_the_model_is_refused(smoke_run, tmp_path):
    import shutil
    copy = tmp_path / "wd"
    shutil.copytree(smoke_run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["hidden_size"] = 24  # pretend the workdir was made for a wider model
    (copy / "config.json").write_text(json.dumps(config))
    wider = _smoke()
    wider.model.hidden_size = 24
    with pytest.raises(ValueError, match="base checkpoint .* does not match config.model"):
        pipeline.run(wider, copy)


# --------------------------------------------------------------------------- budgets (fast)


@pytest.mark.slow
def test_budgets_equal_compute_and_equal_steps(monkeypatch, tmp_path):
    """Every training call is recorded: experts S each, multi-task SFT n*S (= the experts'
    sum) or S, multi-stage stages |g|*S summing to n*S, CPI-FT stages |g|*S_cpift."""
    calls = []

    def fake_train(ctx, params, weights, steps, *, frozen=None, stream=0, name="train"):
        calls.append((name, dict(weights), steps, frozen is not None))
        return params

    monkeypatch.setattr(methods, "train_on", fake_train)
    monkeypatch.setattr(methods, "evaluate", lambda ctx, params, tasks=None: {
        t: 0.5 for t in (ctx.tasks if tasks is None else tasks)})
    config = _smoke()
    config.forgetting.enabled = False
    pipeline.run(config, tmp_path / "wd")
    s, c, n = config.train.steps_per_task, config.cpift.steps_per_task, len(config.suite.tasks)
    by = {}
    for name, weights, steps, frozen in calls:
        by.setdefault(name.rstrip("0123456789"), []).append((weights, steps, frozen))
    experts = [steps for name, _, steps, _ in calls if name.startswith("expert_")]
    assert experts == [s] * n
    multitask = [steps for name, _, steps, _ in calls if name == "multitask"]
    assert sorted(multitask) == [s, n * s]
    stages = [(w, steps) for name, w, steps, _ in calls if name.startswith("stage")]
    assert sum(steps for _, steps in stages) == 2 * n * s  # random + heuristic, n*S each
    cpift = [(w, steps, fr) for name, w, steps, fr in calls if name.startswith("cpift")]
    assert sum(steps for _, steps, _ in cpift) == n * c
    assert not cpift[0][2] and all(fr for _, _, fr in cpift[1:])  # stage 1 frees nothing
    assert pipeline.budgets(config)["multitask_sft"].startswith(f"{n * s} steps")
    # The step count that experiments/step_time.py multiplies is every call's steps.
    assert sum(config_checks.optimizer_steps(config).values()) == sum(call[2] for call in calls)


def test_stage_weights_replay_and_heuristic_groups():
    ctx = methods.Context(None, None, None, ("a", "b", "c"), {}, {},
                          {"a": 0.5, "b": 0.25, "c": 0.25}, None, 4, 1, 0, None)
    assert methods.stage_weights(ctx, ["a", "b"], [], 0.2) == {"a": 2 / 3, "b": 1 / 3}
    w = methods.stage_weights(ctx, ["c"], ["a", "b"], 0.2)
    assert w == pytest.approx({"c": 0.8, "a": 0.1, "b": 0.1})
    groups = methods.heuristic_groups(["a", "b", "c", "d", "e"],
                                      {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.9, "e": 0.3}, 3)
    assert groups == [["b"], ["d", "c"], ["e", "a"]]


def test_core_keys_are_every_setting_that_core_masks_reads():
    cfg, read = _smoke().cpift, set()

    class Recording:
        def __getattr__(self, name):
            read.add(name)
            return getattr(cfg, name)

    base = {"w": np.zeros((4, 4), np.float32)}
    methods.core_masks(base, [{"w": np.arange(16, dtype=np.float32).reshape(4, 4)}], Recording())
    assert read == set(methods.CORE_KEYS)


def test_only_variants_that_keep_the_core_settings_reuse_the_stored_cores():
    config = toy.get_config("ablations")
    variants = config_checks.ablation_variants(config)
    reused = {key for key, (_, overrides) in variants.items() if methods.keeps_cores(config.cpift, overrides)}
    assert reused == {"ablation_tau0", "ablation_linear", "ablation_no_freeze", "ablation_no_replay",
                      "ablation_order_backward_transfer", "ablation_order_structured_first"}
    assert {"ablation_no_embed_head", "ablation_p0.5", "ablation_p5"} <= set(variants)


def test_core_settings_equal_to_the_main_runs_keep_its_cores():
    cpift = toy.get_config().cpift  # p 0.01, scope global, no exclusions
    assert methods.keeps_cores(cpift, {"p": 0.01, "scope": "global", "core_exclude": [], "tau": 0.0})
    assert not methods.keeps_cores(cpift, {"p": 0.02})
    assert not methods.keeps_cores(cpift, {"scope": "leaf"})
    assert not methods.keeps_cores(cpift, {"core_exclude": ("embed",)})


# ----------------------------------------------------------------------------- normalisation


def test_normalized_average_written_out_with_the_chance_guard():
    chance = {"x": 0.1, "y": 0.0, "z": 0.2}
    expert = {"x": 0.6, "y": 0.8, "z": 0.22}  # z's expert is at chance: left out
    scores = {"x": 0.35, "y": 0.2, "z": 0.9}
    # x: (0.35 - 0.1) / 0.5 = 0.5; y: 0.2 / 0.8 = 0.25
    assert aggregate.normalized_average(scores, expert, chance) == pytest.approx(0.375)
    assert aggregate.normalized_average(expert, expert, chance) == pytest.approx(1.0)
    assert math.isnan(aggregate.normalized_average({"z": 1.0}, {"z": 0.2}, {"z": 0.2}))
    assert "(score_t - chance_t) / (expert_t - chance_t)" in aggregate.NORMALIZATION


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("edit, match", [
    (lambda c: setattr(c.suite, "tasks", ("arith", "nope", "logic")), "unknown task 'nope'"),
    (lambda c: setattr(c, "methods", ("cpift", "magic")), "config 'methods' .*magic"),
    (lambda c: setattr(c.cpift, "p", 0.0), r"config 'cpift.p' must be in \(0, 1\]"),
    (lambda c: setattr(c.cpift, "p", 1.5), r"config 'cpift.p'"),
    (lambda c: setattr(c.cpift, "tau", -0.1), r"config 'cpift.tau'"),
    (lambda c: setattr(c.cpift, "tau", 1.1), r"config 'cpift.tau'"),
    (lambda c: setattr(c.data, "n_train", 0), "empty dataset"),
    (lambda c: setattr(c.data, "n_train", 3), "smaller than one batch"),
    (lambda c: setattr(c.forgetting, "pair", ("arith", "arith")), "forgetting.pair"),
    (lambda c: setattr(c.cpift, "merge", "nope"), "cpift.merge"),
    (lambda c: setattr(c.cpift, "backbone", "/no/such/ckpt"), "cpift.backbone"),
    (lambda c: setattr(c.ablations, "p_values", (2.0,)), "ablations.p_values"),
    (lambda c: setattr(c.merge_only, "operators", ("nope",)), "merge_only.operators"),
])
def test_bad_config_is_refused_before_any_work(edit, match, tmp_path):
    config = _smoke()
    config.merge_only.enabled = True
    edit(config)
    with pytest.raises(ValueError, match=match):
        pipeline.run(config, tmp_path / "wd")
    assert not (tmp_path / "wd").exists()


# ------------------------------------------------------------------ merge-only: honest failures

_DECLARATIONS = "REQUIRES_BASE = True\nMIN_MODELS = {min_models}\nMAX_MODELS = None\n"
_WORKING = "from cpift_jax.merges.linear import merge  # noqa: F401\n"
_FAILING = ("def merge(models, *, base=None, weights=None):\n"
            "    raise ValueError('boom: a bug in the operator')\n")


@pytest.fixture
def extra_operators(tmp_path, monkeypatch):
    """``write(name, source)`` adds an operator module that ``cpift_jax.merges`` finds by name
    (a folder appended to the package's ``__path__``, as any plug-in package would be)."""
    import importlib
    import sys

    from cpift_jax import merges

    folder = tmp_path / "extra_merges"
    folder.mkdir()
    monkeypatch.setattr(merges, "__path__", [*merges.__path__, str(folder)])
    written = []

    def write(name: str, source: str) -> None:
        (folder / f"{name}.py").write_text(source)
        sys.modules.pop(f"cpift_jax.merges.{name}", None)  # the new source, not a cached module
        importlib.invalidate_caches()
        written.append(name)

    yield write
    for name in written:
        sys.modules.pop(f"cpift_jax.merges.{name}", None)


def _merge_only_config(*operators):
    """The smoke config cut to the experts and the merge-only block (training faked below)."""
    config = _smoke()
    config.methods = ("single_task",)
    config.forgetting.enabled = False
    config.merge_only.enabled = True
    config.merge_only.operators = operators
    return config


@pytest.fixture
def fake_training(monkeypatch):
    """Experts equal to the base and a constant score: these tests are about stage outcomes."""
    monkeypatch.setattr(methods, "train_on", lambda ctx, params, *a, **k: params)
    monkeypatch.setattr(methods, "evaluate", lambda ctx, params, tasks=None: {
        t: 0.5 for t in (ctx.tasks if tasks is None else tasks)})


@pytest.mark.slow
def test_a_merge_operator_that_does_not_apply_is_recorded_as_such_and_the_run_goes_on(
        extra_operators, fake_training, tmp_path):
    n = len(_smoke().suite.tasks)
    extra_operators("needs_many", _DECLARATIONS.format(min_models=n + 1) + _FAILING)
    workdir = tmp_path / "wd"
    pipeline.run(_merge_only_config("needs_many", "linear"), workdir)
    from cpift_jax.training.checkpoints import read_json

    reason = f"needs_many merges at least {n + 1} models, got {n}"
    # The operator never ran (it would have raised): its stage records why it does not apply.
    assert read_json(workdir / "seed0" / "merge_needs_many" / "DONE.json")["result"] == {
        "status": "not_applicable", "reason": reason}
    rows = json.loads((workdir / "results.json").read_text())["methods"]
    assert rows["merge_needs_many"]["status"] == "not_applicable"
    assert rows["merge_needs_many"]["reason"] == reason
    assert rows["merge_linear"]["status"] == "ok"  # the stage after it still ran
    assert rows["merge_linear"]["per_task"]


@pytest.mark.slow
def test_a_failing_merge_operator_fails_the_run_naming_the_stage_and_is_retried(
        extra_operators, fake_training, tmp_path):
    extra_operators("flaky", _DECLARATIONS.format(min_models=1) + _FAILING)
    config, workdir = _merge_only_config("flaky"), tmp_path / "wd"
    with pytest.raises(RuntimeError, match=r"stage seed0/merge_flaky failed: merge operator "
                                           r"'flaky' raised ValueError: boom"):
        pipeline.run(config, workdir)
    assert not (workdir / "seed0" / "merge_flaky" / "DONE.json").exists()  # nothing recorded
    before = _markers(workdir)
    assert "seed0/experts" in before

    extra_operators("flaky", _DECLARATIONS.format(min_models=1) + _WORKING)  # the bug fixed
    pipeline.run(config, workdir)
    after = _markers(workdir)
    assert "seed0/merge_flaky" in after and "results" in after
    assert all(after[k] == before[k] for k in before)  # only the failed stage was redone
    rows = json.loads((workdir / "results.json").read_text())["methods"]
    assert rows["merge_flaky"]["status"] == "ok"



def test_probe_effects_read_the_experts_stage():
    result = {"scores": {"a": {"a": 0.9, "b": 0.1}, "b": {"a": 0.3, "b": 0.6}},
              "base": {"a": 0.5, "b": 0.2}}
    effects = methods.probe_effects(("a", "b"), result)
    np.testing.assert_allclose(effects["transfer"], [[0.4, -0.1], [-0.2, 0.4]])
    assert effects["gains"] == pytest.approx([0.4 / 0.5, 0.4 / 0.8])


def test_learning_rate_scales_inversely_with_width_from_the_reference():
    config = toy.get_config()
    config.train.optimizer.learning_rate = 3e-3
    assert config_checks.learning_rate(config) == 3e-3  # no reference width: as configured
    config.train.lr_reference_width = 128
    for width, want in ((64, 6e-3), (128, 3e-3), (256, 1.5e-3)):
        config.model.hidden_size = width
        assert config_checks.learning_rate(config) == pytest.approx(want)
    config.model.backend = "smollm2"
    with pytest.raises(ValueError, match="'train.lr_reference_width'"):
        config_checks.learning_rate(config)
