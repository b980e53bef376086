"""A pipeline's working directory: config pinning and resumable, skip-if-done stages.

Layout::

    workdir/config.json          the config the directory was made with (frozen on first use)
    workdir/<stage>/...          a stage's artifacts
    workdir/<stage>/DONE.json    written last, atomically: the stage is complete

A rerun skips every stage whose ``DONE.json`` exists; an interrupted stage (no marker) is
redone in a fresh directory, and the partial one is kept aside as ``<stage>.partial-<n>``
rather than deleted. Only its mid-stage training checkpoints (``<stage>/train_state/``, written
when ``config.train.checkpoint_every`` is set) move into the fresh directory, so every training
run of the stage resumes from its last checkpoint instead of step 0.

Many processes: every process runs every stage (the stages are collective programs), reading
the same workdir on a shared filesystem. Only process 0 writes ``config.json``, moves partial
directories and writes ``DONE.json``, and only after a barrier that every process reaches when
its part of the stage (its shards of every checkpoint) is written; each barrier has a timeout
(``barrier_timeout_s``) so a lost process fails the run with the barrier's name, never a hang. A workdir made with a different config is refused
with the differing keys named. Each finished or skipped stage is one line on the progress logger
(``cpift_jax.benchmark.console``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import logging

from cpift_jax import distributed
from cpift_jax.benchmark import console
from cpift_jax.training.checkpoints import config_diff, read_json, write_json

__all__ = ["Workdir", "RESUME_DIR"]

_DONE = "DONE.json"
RESUME_DIR = "train_state"  # mid-stage checkpoints: survive an interrupted stage


class Workdir:
    """Stages chained through artifacts under one directory."""

    def __init__(self, root: str | os.PathLike, config: dict, *, ignore_keys: tuple[str, ...] = (),
                 barrier_timeout_s: float = 3600.0):
        """``config`` is a JSON-able dict; keys in ``ignore_keys`` may change between runs.
        ``barrier_timeout_s`` bounds the wait for the other processes at each stage boundary
        (the slowest stage's imbalance between processes, not the stage's length)."""
        self.root = Path(root).absolute()
        self.barrier_timeout_s = float(barrier_timeout_s)
        if distributed.is_primary():
            self.root.mkdir(parents=True, exist_ok=True)
        self._barrier("workdir")
        config = json.loads(json.dumps(config))  # normalise tuples etc. as JSON would
        config_path = self.root / "config.json"
        if config_path.exists():
            stored = read_json(config_path)
            differing = [
                k for k in config_diff(stored, config)
                if not any(k == i or k.startswith(i + ".") for i in ignore_keys)
            ]
            if differing:
                raise ValueError(
                    f"workdir {self.root} was made with a different config; differing keys: "
                    f"{', '.join(differing)}. Use a new --workdir or the original config."
                )
        elif distributed.is_primary():
            write_json(config_path, config)
        self.config = config

    def _barrier(self, name: str) -> None:
        distributed.barrier(f"workdir:{name}", timeout_s=self.barrier_timeout_s)

    def path(self, stage: str) -> Path:
        return self.root / stage

    def done(self, stage: str) -> bool:
        return (self.path(stage) / _DONE).exists()

    def result(self, stage: str) -> Any:
        """The JSON-able value the stage returned when it completed."""
        marker = self.path(stage) / _DONE
        if not marker.exists():
            raise FileNotFoundError(f"stage '{stage}' has not completed in {self.root}")
        return read_json(marker)["result"]

    def run(self, stage: str, fn: Callable[[Path], Any]) -> Any:
        """Runs ``fn(stage_dir)`` unless the stage is complete; returns its JSON-able result."""
        if self.done(stage):
            console.progress.info("stage %s: done in an earlier run, skipped", stage)
            return self.result(stage)
        stage_dir = self.path(stage)
        if distributed.is_primary():
            _fresh_stage_dir(stage, stage_dir)
        self._barrier(f"{stage}:start")
        start = time.time()
        logging.info("stage %s: running", stage)
        result = fn(stage_dir)
        seconds = time.time() - start
        self._barrier(f"{stage}:written")  # every process's shards are on disk
        if distributed.is_primary():
            write_json(stage_dir / _DONE, {"result": result, "seconds": seconds})
        self._barrier(f"{stage}:done")
        console.progress.info("stage %s: done in %s", stage, console.seconds(seconds))
        return result


def _fresh_stage_dir(stage: str, stage_dir: Path) -> None:
    """An empty ``stage_dir``; a partial one is moved aside, its ``RESUME_DIR`` moved back."""
    if stage_dir.exists():
        n = 0
        while (aside := stage_dir.with_name(f"{stage_dir.name}.partial-{n}")).exists():
            n += 1
        logging.warning("stage %s: incomplete artifacts moved to %s", stage, aside)
        stage_dir.rename(aside)
        stage_dir.mkdir(parents=True)
        if (aside / RESUME_DIR).exists():
            (aside / RESUME_DIR).rename(stage_dir / RESUME_DIR)
            console.progress.info("stage %s: resuming from its training checkpoints", stage)
    else:
        stage_dir.mkdir(parents=True)
