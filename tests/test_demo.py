"""End-to-end test of the operator demo (experiments/demo.py on configs/demo.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import demo as demo_config
from cpift_jax.benchmark import demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_binary_runs_and_its_checks_pass():
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.demo", "--config=configs/demo.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "toy model: 32,768 parameters, 4 task models" in out
    assert "clusters at tau=0.1: [[0, 1], [2, 3]]" in out
    assert "PASS  clusters == planted groups [[0, 1], [2, 3]]" in out
    assert "PASS  exclusive core entries transplanted unchanged" in out
    assert "PASS  frozen entries bit-identical, the others trained" in out
    assert "FAIL" not in out
    assert "config:" in proc.stderr and "devices:" in proc.stderr  # logged, not printed


@pytest.mark.slow
def test_demo_checks_can_fail():
    # At tau = 0.99 the planted pairs (Jaccard ~0.97) are no longer linked: four singletons.
    config = demo_config.get_config()
    config.tau = 0.99
    config.optimizer.total_steps, config.optimizer.warmup_steps = 3, 1  # fast: checks still run
    report, checks = demo.run(config)
    assert checks == {"clusters": False, "transplant": True, "frozen": True}
    assert "FAIL  clusters == planted groups [[0, 1], [2, 3]]" in report
    assert demo.planted_groups(config) == [[0, 1], [2, 3]]
    config.num_tasks, config.tasks_per_region = 5, 2
    assert demo.planted_groups(config) == [[0, 1], [2, 3], [4]]


def test_demo_config_variants():
    assert demo_config.get_config("large").width == 1024
    with pytest.raises(ValueError, match="unknown variant 'huge' of configs/demo.py; known: large"):
        demo_config.get_config("huge")
