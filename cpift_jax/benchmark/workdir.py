"""A pipeline's working directory: config pinning and resumable, skip-if-done stages.

Layout::

    workdir/config.json          the config the directory was made with (frozen on first use)
    workdir/<stage>/...          a stage's artifacts
    workdir/<stage>/DONE.json    written last, atomically: the stage is complete

A rerun skips every stage whose ``DONE.json`` exists; an interrupted stage (no marker) is
redone from scratch in a fresh directory, and the partial one is kept aside as
``<stage>.partial-<n>`` rather than deleted. A workdir made with a different config is refused
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

from cpift_jax.benchmark import console
from cpift_jax.training.checkpoints import config_diff, read_json, write_json

__all__ = ["Workdir"]

_DONE = "DONE.json"


class Workdir:
    """Stages chained through artifacts under one directory."""

    def __init__(self, root: str | os.PathLike, config: dict, *, ignore_keys: tuple[str, ...] = ()):
        """``config`` is a JSON-able dict; keys in ``ignore_keys`` may change between runs."""
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
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
        else:
            write_json(config_path, config)
        self.config = config

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
        if stage_dir.exists():
            n = 0
            while (aside := stage_dir.with_name(f"{stage_dir.name}.partial-{n}")).exists():
                n += 1
            logging.warning("stage %s: incomplete artifacts moved to %s", stage, aside)
            stage_dir.rename(aside)
        stage_dir.mkdir(parents=True)
        start = time.time()
        logging.info("stage %s: running", stage)
        result = fn(stage_dir)
        seconds = time.time() - start
        write_json(stage_dir / _DONE, {"result": result, "seconds": seconds})
        console.progress.info("stage %s: done in %s", stage, console.seconds(seconds))
        return result
