"""The CPI-FT benchmark: pipeline, baselines, ablations, forgetting; writes results.json/.md.

    python -m experiments.cpift --config=configs/toy.py --workdir=/tmp/toy_default

A rerun with the same workdir skips completed stages; another config is refused.
"""

import os

# The toy models are far too small for XLA's intra-op thread pool to pay off; on a shared CPU
# one thread per op measured about 2x faster per train step. An explicit XLA_FLAGS wins.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/toy.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for artifacts and results",
                               required=True)


def main(argv):
    del argv
    import jax

    from cpift_jax.benchmark import pipeline

    config = _CONFIG.value
    logging.info("config:\n%s", config)
    logging.info("devices: %s", jax.devices())
    results = pipeline.run(config, _WORKDIR.value)
    logging.info("total stage time %.1f s", results["timings"]["total_s"])
    print(os.path.join(os.path.abspath(_WORKDIR.value), "results.md"))


if __name__ == "__main__":
    app.run(main)
