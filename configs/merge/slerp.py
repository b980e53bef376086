"""SLERP of two checkpoints, with mergekit's classic layer-gradient recipe.

    python -m experiments.merge --config=configs/merge/slerp.py:MODEL_A,MODEL_B \
        --config.output=out/slerp

t interpolates from MODEL_A (t = 0) to MODEL_B (t = 1); mergekit calls MODEL_A the base_model.
Attention tensors follow the gradient (0, 0.5, 0.3, 0.7, 1) from the first to the last layer,
MLP tensors the mirrored one, everything else t = 0.5 (tensors outside the layer stack take a
gradient's first anchor, as in mergekit). Expected: a Hugging Face directory in about 1-2
minutes per 2 x 1B parameters on a 2-core CPU.
"""

from configs.merge import base_config, paths_from_arg


def get_config(arg: str | None = None):
    config = base_config("slerp")
    config.models = tuple(paths_from_arg(arg, minimum=2, usage="MODEL_A,MODEL_B"))
    config.params.t = 0.5
    config.params.granularity = "leaf"  # mergekit's: one angle per tensor
    config.rules = (
        (r".*self_attn.*", {"t": (0.0, 0.5, 0.3, 0.7, 1.0)}),
        (r".*mlp.*", {"t": (1.0, 0.5, 0.7, 0.3, 0.0)}),
    )
    return config
