"""One knob over the CPI-FT benchmark; prints each method's score and advantage per value.

    python -m experiments.sweep --config=configs/toy.py:sweep --knob=suite.similarity \
        --values=0,0.25,0.5 --workdir=/tmp/toy_sweep

One workdir per value under --workdir (each holds its config.json and results.md). The console
shows one line per finished stage (stderr) and the table (stdout); --verbosity=0 shows the
libraries' INFO logs.
"""

import os

# The toy models are far too small for XLA's intra-op thread pool to pay off; on a shared CPU
# one thread per op measured about 2x faster per train step. An explicit XLA_FLAGS wins.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/toy.py:sweep", lock_config=True)
_KNOB = flags.DEFINE_string("knob", None, "dotted config field, e.g. suite.similarity",
                            required=True)
_VALUES = flags.DEFINE_string("values", None, "comma-separated values", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "root directory (one workdir per value)",
                               required=True)


def main(argv):
    del argv
    from cpift_jax.benchmark import console, sweep

    console.setup()
    rows = sweep.sweep(_CONFIG.value, _KNOB.value, sweep.parse_values(_VALUES.value),
                       _WORKDIR.value)
    print(sweep.format_table(_KNOB.value, rows))


if __name__ == "__main__":
    app.run(main)
