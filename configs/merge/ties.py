"""TIES merge of fine-tunes of one base (trim to the top density, elect signs, disjoint mean).

    python -m experiments.merge --config=configs/merge/ties.py:BASE,MODEL_A,MODEL_B[,...] \
        --config.output=out/ties [--config.params.density=0.3]

The first path is the base the task vectors are measured from. Trimming ranks each tensor on
its own (scope='leaf', as mergekit does; a whole-model ranking cannot stream). Expected: a
Hugging Face directory in a few minutes per 3 x 1B parameters on a 2-core CPU.
"""

from ml_collections import config_dict

from configs.merge import base_config, paths_from_arg


def get_config(arg: str | None = None):
    config = base_config("ties")
    paths = paths_from_arg(arg, minimum=2, usage="BASE,MODEL[,MODEL...]")
    config.base = paths[0] if paths else ""
    config.models = tuple(paths[1:])
    config.params.density = 0.5
    config.params.scale = 1.0
    # None: 1 per model (the paper's plain sum of task vectors); or a tuple, one per model.
    config.params.weights = config_dict.placeholder(tuple)
    config.params.sign_method = "sum"
    return config
