"""Registries by module name: merge operators and synthetic tasks."""

import pytest

from cpift_jax import merges
from cpift_jax.data import tasks


def test_merge_registry_lists_operator_files_and_loads_them():
    names = merges.available()
    assert {"linear", "slerp"} <= set(names)
    assert not [n for n in names if n.startswith("_")]  # helpers are not operators
    assert merges.get("linear") is merges.get_module("linear").merge


def test_unknown_merge_lists_what_exists():
    with pytest.raises(ValueError, match=r"unknown merge operator 'nope'; available merge "
                                         r"operators: .*linear.*slerp"):
        merges.get("nope")


def test_unknown_task_lists_what_exists():
    with pytest.raises(ValueError, match=r"unknown task 'nope'; available tasks: arith"):
        tasks.get_module("nope")
    assert "recall" in tasks.available()
