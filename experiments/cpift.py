"""The CPI-FT benchmark: pipeline, baselines, ablations, forgetting; writes results.json/.md.

    python -m experiments.cpift --config=configs/toy.py --workdir=/tmp/toy_default

A rerun with the same workdir skips completed stages; another config is refused. The console
shows one line per finished stage (stderr), then the verdict and the report's path (stdout); the
full config is in <workdir>/config.json. Library logs (Orbax, JAX, absl) are shown from WARNING
up; --verbosity=0 shows INFO, --verbosity=1 DEBUG.
"""

import os

# The toy models are far too small for XLA's intra-op thread pool to pay off; on a shared CPU
# one thread per op measured about 2x faster per train step. An explicit XLA_FLAGS wins.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")

import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/toy.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for artifacts and results",
                               required=True)
# Many hosts (docs/multihost.md): all three, or none for JAX's TPU/SLURM/Open MPI detection.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0-based")
_BIND = flags.DEFINE_string("coordinator_bind_address", None,
                            "address:port the coordinator listens on (default: the coordinator "
                            "address, not every interface)")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", 100,
                                  "seconds without heartbeats after which a process counts as "
                                  "dead and the run is stopped")


def main(argv):
    del argv
    from cpift_jax import distributed

    # Before any other JAX call: the backend must see every process.
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           coordinator_bind_address=_BIND.value,
                           heartbeat_timeout_s=_HEARTBEAT.value)
    import jax

    from cpift_jax.benchmark import console, pipeline, report

    console.setup()
    start = time.perf_counter()
    workdir = os.path.abspath(_WORKDIR.value)
    console.progress.info("workdir %s (its config.json holds the full config); devices: %s",
                          workdir, ", ".join(str(d) for d in jax.devices()))
    results = pipeline.run(_CONFIG.value, workdir)
    console.progress.info("finished in %s", console.seconds(time.perf_counter() - start))
    if distributed.is_primary():
        print(report.verdict(results))
        print(f"results: {os.path.join(workdir, report.REPORT_FILE)}")


if __name__ == "__main__":
    app.run(main)
