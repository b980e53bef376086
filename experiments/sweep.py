"""One or two knobs over the CPI-FT benchmark: a grid of workdirs and the regime map over it.

    python -m experiments.sweep --config=configs/toy.py:sweep --knob=conflict --values=0.5,1 \
        --knob2=capacity --values2=32,64 --config.data.seq_len=72 --workdir=/tmp/regime

One workdir per cell under --workdir, ``<knob>=<value>[,<knob2>=<value2>]`` (each holds its
config.json, results.md and plots/); a rerun resumes (finished cells are read back, unfinished
ones resume stage by stage). Knobs: a dotted config field or an alias (conflict, tag, imbalance,
capacity, tasks, p, tau; cpift_jax/benchmark/sweep.py). Then the regime map: paired comparisons
with bootstrap intervals per cell in --workdir/regime_map.md and .json, one heat map per
comparison in --workdir/plots/ (cpift_jax/benchmark/regime_map.py). Without --knob2 the grid
is one row and the one-knob table (each method's score and advantage over multi-task SFT) is
printed too. The console shows one line per finished stage (stderr); --verbosity=0 shows the
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
_KNOB = flags.DEFINE_string("knob", None, "alias (conflict, tag, imbalance, capacity, tasks, p, "
                            "tau) or dotted config field, e.g. suite.similarity", required=True)
_VALUES = flags.DEFINE_string("values", None, "comma-separated values", required=True)
_KNOB2 = flags.DEFINE_string("knob2", None, "second knob (y axis of the heat maps); optional")
_VALUES2 = flags.DEFINE_string("values2", None, "comma-separated values of --knob2")
_WORKDIR = flags.DEFINE_string("workdir", None, "root directory (one workdir per cell)",
                               required=True)
_RESAMPLES = flags.DEFINE_integer("resamples", 2000, "bootstrap replicates per comparison")
flags.register_multi_flags_validator(
    ["knob2", "values2"], lambda f: (f["knob2"] is None) == (f["values2"] is None),
    "--knob2 and --values2 go together")


def main(argv):
    del argv
    from cpift_jax.benchmark import console, regime_map, sweep

    console.setup()
    axes = [(_KNOB.value, sweep.parse_values(_VALUES.value))]
    if _KNOB2.value:
        axes.append((_KNOB2.value, sweep.parse_values(_VALUES2.value)))
    cells = sweep.grid(_CONFIG.value, axes, _WORKDIR.value)
    rows = regime_map.analyse(cells, resamples=_RESAMPLES.value)
    paths = regime_map.write(_WORKDIR.value, rows, axes)
    if len(axes) == 1:
        print(sweep.format_table(_KNOB.value, sweep.rows_of(cells)) + "\n")
    print(regime_map.format_markdown(rows, axes))
    console.progress.info("regime map: %s, heat maps in %s", paths["markdown"],
                          os.path.join(_WORKDIR.value, "plots"))


if __name__ == "__main__":
    app.run(main)
