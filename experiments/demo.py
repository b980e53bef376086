"""Demo of the CPI-FT operators on a synthetic pytree: masks -> clusters -> fusion -> freezing.

    python -m experiments.demo --config=configs/demo.py

Prints the report and exits with status 1 if one of its checks fails (see cpift_jax/demo.py).
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cpift_jax.benchmark import demo

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", lock_config=True)


def main(argv):
    del argv
    config = _CONFIG.value
    logging.info("config:\n%s", config)
    logging.info("devices: %s", jax.devices())
    report, checks = demo.run(config)
    print(report)
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        logging.error("demo checks failed: %s", ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
