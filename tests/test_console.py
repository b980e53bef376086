"""The console of long jobs (cpift_jax.benchmark.console): its own progress, not library logs.

The end-to-end test runs the main binary on configs/toy.py:smoke and reads its console the way a
user would: one line per stage, the verdict and the report's path; no Orbax internals and no
config dump unless --verbosity asks for the libraries' logs.
"""

import json
import logging as std_logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from absl import logging

from configs import toy
from cpift_jax.benchmark import console, report
from cpift_jax.benchmark.aggregate import Results
from cpift_jax.benchmark.workdir import Workdir

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^stage (\S+): (done in \d+\.\d s( \(\d+\.\d min\))?|"
                        r"done in an earlier run, skipped)$")
# absl's prefix of a WARNING / ERROR record ("W1203 13:08:27.711895 ..."): allowed through.
LIBRARY_WARNING = re.compile(r"^[WEF]\d{4} ")
ORBAX = re.compile(r"orbax|ocdbt|async_save|checkpointer|event_tracking", re.IGNORECASE)


def test_workdir_reports_each_stage_once(tmp_path, caplog):
    caplog.set_level(std_logging.INFO, logger=console.PROGRESS_LOGGER)
    wd = Workdir(tmp_path, {})
    wd.run("seed0/experts", lambda d: 1)
    wd.run("seed0/experts", lambda d: 1)
    lines = [r.getMessage() for r in caplog.records if r.name == console.PROGRESS_LOGGER]
    assert len(lines) == 2
    assert re.fullmatch(r"stage seed0/experts: done in \d+\.\d s", lines[0]), lines[0]
    assert lines[1] == "stage seed0/experts: done in an earlier run, skipped"


def test_setup_quiets_libraries_and_prints_progress_once(capfd):
    absl_logger = logging.get_absl_logger()
    saved = (logging.get_verbosity(), absl_logger.level, list(console.progress.handlers),
             console.progress.level, console.progress.propagate)
    try:
        console.setup()
        console.setup()  # a second call must not double the lines
        assert not absl_logger.isEnabledFor(std_logging.INFO)
        assert absl_logger.isEnabledFor(std_logging.WARNING)
        console.progress.info("stage %s: done in %s", "x", console.seconds(75.0))
        assert capfd.readouterr().err == "stage x: done in 75.0 s (1.2 min)\n"
    finally:
        logging.set_verbosity(saved[0])
        absl_logger.setLevel(saved[1])
        console.progress.handlers[:] = saved[2]
        console.progress.setLevel(saved[3])
        console.progress.propagate = saved[4]


def _run_binary(workdir: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device is enough
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cpift", "--config=configs/toy.py:smoke",
         f"--workdir={workdir}", *flags], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _stages(workdir: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(workdir)) for p in workdir.rglob("DONE.json")
                  if ".partial-" not in str(p))


@pytest.mark.slow
def test_main_binary_console_shows_stages_verdict_and_results_only(tmp_path):
    workdir = tmp_path / "wd"
    proc = _run_binary(workdir)
    err = proc.stderr.splitlines()
    stage_lines = [line for line in err if STAGE_LINE.match(line)]
    # One line per stage the run completed, each once.
    assert sorted(STAGE_LINE.match(line)[1] for line in stage_lines) == _stages(workdir)
    assert all("done in an earlier run" not in line for line in stage_lines)
    assert err[0].startswith(f"workdir {workdir} (its config.json holds the full config)")
    assert re.fullmatch(r"finished in \d+\.\d s( \(\d+\.\d min\))?", err[-1]), err[-1]
    # Nothing else but library warnings: no Orbax internals, no config dump.
    others = [line for line in err[1:-1] if not STAGE_LINE.match(line)]
    assert all(LIBRARY_WARNING.match(line) for line in others), others[:10]
    assert not [line for line in err if ORBAX.search(line)]
    assert not [line for line in err if "p_values" in line or "weight_decay_mask" in line]
    # stdout: the verdict, then where the results are.
    results = Results.load(workdir / "results.json")
    assert proc.stdout.splitlines() == [report.verdict(results),
                                        f"results: {workdir / 'results.md'}"]
    # The full config went to the workdir instead.
    config = json.loads(json.dumps(toy.get_config("smoke").to_dict()))
    assert json.loads((workdir / "config.json").read_text()) == config

    # --verbosity opens the libraries' INFO logs; the stage lines are still printed once.
    again = _run_binary(workdir, "--verbosity=0").stderr.splitlines()
    assert any(ORBAX.search(line) for line in again)
    skipped = [STAGE_LINE.match(line)[1] for line in again if STAGE_LINE.match(line)]
    assert sorted(skipped) == _stages(workdir)
