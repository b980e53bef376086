"""Linear merge (model soup) of any number of checkpoints.

    python -m experiments.merge --config=configs/merge/linear.py:MODEL_A,MODEL_B[,...] \
        --config.output=out/soup [--config.params.weights="(0.7,0.3)"]

Expected: about 1 minute per 3 x 1B float32 parameters on a 2-core CPU (I/O bound, see
experiments/bench_merge.py); the output loads with AutoModelForCausalLM.from_pretrained.
"""

from ml_collections import config_dict

from configs.merge import base_config, paths_from_arg


def get_config(arg: str | None = None):
    config = base_config("linear")
    config.models = tuple(paths_from_arg(arg, minimum=1, usage="MODEL[,MODEL...]"))
    # None: equal weights; a tuple (one per model, normalised) on the command line.
    config.params.weights = config_dict.placeholder(tuple)
    config.params.normalize = True
    return config
