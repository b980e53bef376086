"""experiments/step_time.py: times the smoke config's step and multiplies by its step count."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from configs import toy
from cpift_jax.benchmark import config_checks

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a subprocess: pretrains the smoke base and compiles one step
def test_prints_the_median_step_and_the_predicted_training_time(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as users
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.step_time", "--config=configs/toy.py:smoke",
         "--steps=4", f"--workdir={tmp_path / 'wd'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    median = float(re.search(r"steps 2-4: median ([0-9.]+) s/step", out).group(1))
    assert median > 0
    per_seed = sum(config_checks.optimizer_steps(toy.get_config("smoke")).values())
    assert f"; {per_seed} in all" in out
    predicted = re.search(r"predicted training time, 1 seed\(s\) x (\d+) steps x ([0-9.]+) s: "
                          r"([0-9.]+) s", out)
    assert int(predicted.group(1)) == per_seed
    assert float(predicted.group(3)) == pytest.approx(per_seed * median, abs=1.0)


def test_optimizer_steps_counts_every_budget():
    c = toy.get_config()  # 5 tasks, S 300, C 150, F 150
    steps = config_checks.optimizer_steps(c)
    assert steps == {"experts": 1500, "multitask_sft": 1500, "multitask_sft_equal_steps": 300,
                     "multistage_random": 1500, "multistage_heuristic": 1500, "cpift": 750,
                     "forgetting": 600, "half_probes": 0}
    c.analysis.core_stability = True
    c.forgetting.enabled = False
    c.methods = ("single_task", "cpift")
    assert config_checks.optimizer_steps(c) == {
        "experts": 1500, "multitask_sft": 0, "multitask_sft_equal_steps": 0,
        "multistage_random": 0, "multistage_heuristic": 0, "cpift": 750, "forgetting": 0,
        "half_probes": 750}
