"""bench_fusion end to end on a small size: every row printed, the fusion equal to the NumPy
baseline, the thresholds equal, the round counts stated and bad round counts refused."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bench(*flags):
    return subprocess.run([sys.executable, "-m", "experiments.bench_fusion", "--params=2e6",
                           "--threshold_values=1e5", *flags], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_small_run_prints_every_row_and_agrees_with_numpy():
    result = run_bench("--repeats=3", "--numpy_repeats=1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for label in ("np.copyto (bandwidth)", "fusion (ours)", "fusion (numpy)", "threshold (masks)",
                  "threshold (np.partition)"):
        assert label in out
    assert re.search(r"of bandwidth \(rounds \d+%-\d+%\)", out)
    assert "median rounds 3 (NumPy baseline 1)" in out
    assert "thresholds equal: True" in out
    assert float(re.search(r"max \|ours - numpy\| = (\S+);", out).group(1)) < 1e-4


def test_repeats_below_one_are_refused():
    result = run_bench("--numpy_repeats=0")
    assert result.returncode != 0
    assert "--repeats and --numpy_repeats must be at least 1" in result.stderr
