"""The one-knob sweep: value parsing, knob setting, the table (pipeline runs faked)."""

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
