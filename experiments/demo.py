"""Demo of the CPI-FT operators on a synthetic pytree: masks -> clusters -> fusion -> freezing."""

from absl import app, flags, logging
from ml_collections import config_flags

from cpift_jax import demo

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", lock_config=True)


def main(argv):
    del argv
    config = _CONFIG.value
    logging.info("config:\n%s", config)
    print(demo.run(config))


if __name__ == "__main__":
    app.run(main)
