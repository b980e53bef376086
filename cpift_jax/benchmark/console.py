"""What a long benchmark job shows on its console: its own progress, not its libraries' logs.

Two channels:

- ``progress`` (the standard-library logger ``cpift_jax.progress``): one line per finished stage
  with its wall time (``Workdir.run``), and the binaries' own lines. ``setup`` prints it on
  stderr at INFO, through ``tqdm.write`` so a line never tears an open progress bar.
- Everything else (absl logging, and through it Orbax and JAX): WARNING and above, unless the
  user asked for more with absl's ``--verbosity`` flag (``--verbosity=0`` INFO, ``1`` DEBUG).

With several processes only process 0 shows progress lines; the others show warnings and errors.

Library code only logs; a binary calls ``setup()`` once, after flag parsing (inside ``main``).
Without ``setup`` the progress lines go to the root logger like any other INFO record.
"""

from __future__ import annotations

import logging as std_logging
import sys

from absl import flags
from absl import logging
from tqdm import tqdm

from cpift_jax import distributed

__all__ = ["PROGRESS_LOGGER", "progress", "setup", "seconds"]

PROGRESS_LOGGER = "cpift_jax.progress"
progress = std_logging.getLogger(PROGRESS_LOGGER)


class _AboveBars(std_logging.Handler):
    """Writes each record as one plain line on stderr, above any open tqdm bar."""

    def emit(self, record: std_logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup() -> None:
    """Library logs at WARNING unless ``--verbosity`` was given; progress lines on stderr."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    for handler in list(progress.handlers):  # a second call replaces, never doubles, the lines
        if isinstance(handler, _AboveBars):
            progress.removeHandler(handler)
    progress.addHandler(_AboveBars())
    progress.setLevel(std_logging.INFO if distributed.is_primary() else std_logging.WARNING)
    progress.propagate = False  # printed once, whatever the root logger's level


def seconds(s: float) -> str:
    """``12.3 s`` or ``754.3 s (12.6 min)``."""
    return f"{s:.1f} s" + (f" ({s / 60:.1f} min)" if s >= 60 else "")
