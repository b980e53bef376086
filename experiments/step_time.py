"""Time a benchmark config's train step on its own batches and predict a full run's training time.

    python -m experiments.step_time --config=configs/real.py --steps=6
    python -m experiments.step_time --config=configs/toy.py --steps=50

Builds seed 0's context as the benchmark does (base model, tokenized and packed task data, the
config's mesh, step options and optimizer; the base stage is run or read back in ``--workdir``),
runs ``--steps`` optimizer steps on the mixture of every task with a record per step, and prints
the first step (compilation included), the median and spread of the others, tokens per step and
per second, and the config's optimizer steps per seed (``config_checks.optimizer_steps``) times
that median: the training time of the whole run on this machine. Evaluation, compilation of the
other programs and checkpoint writes are not included; ablations and merge-only are not counted.
"""

import os

# Same thread setting as experiments/cpift.py, so the timed step is the step the benchmark runs.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/toy.py", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 6, "optimizer steps to run (the first one compiles)")
_WORKDIR = flags.DEFINE_string("workdir", None, "benchmark workdir holding (or to hold) the base "
                               "stage; default: a temporary directory")


def _hours(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 3600:.2f} h"


def main(argv):
    del argv
    if _STEPS.value < 3:
        raise app.UsageError("--steps must be >= 3 (one compiles, the others are timed)")
    from cpift_jax.benchmark import config_checks, methods, pipeline

    config = _CONFIG.value
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(_WORKDIR.value or Path(tmp) / "workdir")
        ctx = pipeline.context(config, workdir, seed=0)
        stage_dir = Path(tmp) / "timed"
        stage_dir.mkdir()
        methods.train_on(dataclasses.replace(ctx, stage_dir=stage_dir, progress=False),
                         ctx.base, dict(ctx.mixture), _STEPS.value, name="timed", log_every=1)
        records = [json.loads(line) for line in (stage_dir / "timed.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records]
    per_step = [b - a for a, b in zip(elapsed, elapsed[1:])]
    median = statistics.median(per_step)
    rows = config.train.batch_size
    seq = config.data.seq_len
    steps = config_checks.optimizer_steps(config)
    per_seed = sum(steps.values())
    total = per_seed * len(config.seeds)
    print(f"config: {rows} rows x {seq} tokens per step; mesh {dict(ctx.mesh.shape)}; "
          f"step options {config.train.step.to_dict()}")
    print(f"first step (compiles): {elapsed[0]:.2f} s")
    print(f"steps 2-{len(elapsed)}: median {median:.3f} s/step "
          f"(min {min(per_step):.3f}, max {max(per_step):.3f}), "
          f"{rows * seq / median:,.0f} token slots/s")
    print("optimizer steps per seed: " + ", ".join(f"{k} {v}" for k, v in steps.items() if v)
          + f"; {per_seed} in all")
    print(f"predicted training time, {len(config.seeds)} seed(s) x {per_seed} steps x "
          f"{median:.3f} s: {_hours(total * median)} (evaluation and compilation excluded)")


if __name__ == "__main__":
    app.run(main)
