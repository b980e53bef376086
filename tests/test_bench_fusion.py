"""bench_fusion end to end on a small size, read from its JSON output: every row measured for
the stated number of rounds, the fusion equal to the NumPy baseline, the thresholds equal, and
bad round counts refused."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # each test starts the benchmark binary in a subprocess

REPO = Path(__file__).resolve().parents[1]
ROWS = ["np.copyto", "fusion (ours)", "fusion (numpy)", "threshold (masks)",
        "threshold (np.partition)"]


def run_bench(*flags):
    return subprocess.run([sys.executable, "-m", "experiments.bench_fusion", "--params=2e6",
                           "--threshold_values=1e5", *flags], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_small_run_measures_every_row_and_agrees_with_numpy(tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench("--repeats=3", "--numpy_repeats=1", f"--json_out={out}")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [row["name"] for row in report["rows"]] == ROWS
    assert report["params"] >= 2e6 and report["counted_bytes"] == 2 * 4 * report["params"]
    assert (report["repeats"], report["numpy_repeats"]) == (3, 1)
    for row in report["rows"]:
        # One warm-up round, then the timed rounds (the NumPy baseline only its first ones).
        rounds = 1 + (1 if row["name"] == "fusion (numpy)" else 3)
        assert len(row["seconds"]) == len(row["cpu_seconds"]) == rounds, row["name"]
        assert all(s > 0 for s in row["seconds"]), row["name"]
        assert row["median_s"] == pytest.approx(float(np.median(row["seconds"][1:])))
    # The rows with a target carry a verdict; the reference rows do not.
    verdicts = {row["name"]: row["passed"] for row in report["rows"]}
    assert verdicts["np.copyto"] is None and verdicts["threshold (masks)"] is None
    assert all(isinstance(verdicts[n], bool)
               for n in ("fusion (ours)", "fusion (numpy)", "threshold (np.partition)"))
    assert len(report["bandwidth_ratio_per_round"]) == 3
    assert report["thresholds_equal"] is True
    assert 0 <= report["max_abs_diff"] < 1e-4


def test_repeats_below_one_are_refused(tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench("--numpy_repeats=0", f"--json_out={out}")
    assert result.returncode != 0
    assert "--repeats and --numpy_repeats must be at least 1" in result.stderr
    assert not out.exists()
