"""Tests for cpift_jax.benchmark.workdir: config pinning, skip-if-done and resume after interruption."""

import pytest

from cpift_jax.training.checkpoints import config_diff, read_json
from cpift_jax.benchmark.workdir import Workdir


def test_config_diff_names_nested_keys():
    old = {"a": 1, "b": {"c": 2, "d": 3}}
    new = {"a": 1, "b": {"c": 5}, "e": 0}
    assert config_diff(old, new) == ["b.c", "b.d", "e"]


def test_completed_stage_is_skipped_on_rerun(tmp_path):
    calls = []

    def stage(path):
        calls.append(path)
        (path / "artifact.txt").write_text("x")
        return {"score": 1.5}

    wd = Workdir(tmp_path, {"seed": 0})
    assert wd.run("probe/task0", stage) == {"score": 1.5}
    again = Workdir(tmp_path, {"seed": 0})
    assert again.run("probe/task0", stage) == {"score": 1.5}
    assert len(calls) == 1
    assert read_json(tmp_path / "probe/task0/DONE.json")["result"] == {"score": 1.5}


def test_interrupted_stage_is_redone_and_partial_kept_aside(tmp_path):
    wd = Workdir(tmp_path, {"seed": 0})

    def crash(path):
        (path / "half.txt").write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        wd.run("fusion", crash)
    assert not wd.done("fusion")
    assert wd.run("fusion", lambda path: 7) == 7
    assert (tmp_path / "fusion.partial-0" / "half.txt").read_text() == "partial"
    assert not (tmp_path / "fusion" / "half.txt").exists()


def test_workdir_with_other_config_is_refused_naming_keys(tmp_path):
    Workdir(tmp_path, {"seed": 0, "model": {"width": 64}, "steps": 10})
    with pytest.raises(ValueError, match="differing keys: model.width, steps"):
        Workdir(tmp_path, {"seed": 0, "model": {"width": 32}, "steps": 20})


def test_ignored_keys_may_change(tmp_path):
    Workdir(tmp_path, {"seed": 0, "eval": {"batch_size": 8}})
    Workdir(tmp_path, {"seed": 0, "eval": {"batch_size": 16}}, ignore_keys=("eval",))


def test_result_of_missing_stage_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="stage 'probe' has not completed"):
        Workdir(tmp_path, {}).result("probe")
