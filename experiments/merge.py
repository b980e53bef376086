"""Merges checkpoints tensor by tensor into a new Hugging Face directory.

    python -m experiments.merge --config=configs/merge/ties.py:BASE,A,B --config.output=DIR

Recipes and their keys: configs/merge/. Library: cpift_jax.streaming.merge.
"""

import logging as std_logging

from absl import app, logging
from ml_collections import config_flags

from cpift_jax import streaming

_CONFIG = config_flags.DEFINE_config_file("config", None, "merge recipe", lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/merge/<recipe>.py is required")
    std_logging.getLogger().setLevel(std_logging.INFO)
    logging.info("recipe:\n%s", config)
    result = streaming.merge_from_config(config)
    print(f"wrote {result.output}: {result.num_tensors} tensors, {result.total_bytes / 1e9:.3f} GB "
          f"in {result.num_shards} shards, {result.seconds:.1f} s ({result.execution}, "
          f"{result.compilations} compilations); copied {', '.join(result.copied_files) or '-'}")


if __name__ == "__main__":
    app.run(main)
