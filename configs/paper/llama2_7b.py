"""CPI-FT on Llama-2-7B, the paper's main base model (arXiv 2508.21741, Table 1).

Commands (the checkpoint is the user's: ``meta-llama/Llama-2-7b-hf`` in a local directory):

    python -m experiments.plan --config=configs/paper/llama2_7b.py:v4-32     # memory plan, CPU
    python -m experiments.cpift --config=configs/paper/llama2_7b.py:8gpu \\
        --config.model.hf_path=/path/to/Llama-2-7b-hf --workdir=workdir/llama2_7b

Runs the benchmark of ``configs/toy.py`` (probes, core masks at p = 1%, clusters at tau = 0.1,
fusion, pipeline SFT, the baselines with multi-stage K = 3, the forgetting pair) on the five
SFT tasks of ``configs.paper.PAPER_TASKS`` with full fine-tuning. Variants ``:v4-32``,
``:v5e-64``, ``:8gpu`` (default) size mesh, batch and micro-batches for one slice each;
``experiments/plan.py`` prints whether the train step fits (docs/paper_configs.md).

Architecture: the public ``config.json`` of meta-llama/Llama-2-7b-hf (6.74e9 parameters,
float16 on the hub; float32 master weights here). What the paper leaves open and the defaults
chosen: ``configs/paper/__init__.py``.
"""

from configs import paper
from cpift_jax.models.config import ModelConfig

ARCHITECTURE = ModelConfig(
    model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
    max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
    param_dtype="float32", bos_token_id=1, eos_token_id=2, pad_token_id=None)


def get_config(arg: str | None = None):
    return paper.paper_config(ARCHITECTURE, "meta-llama/Llama-2-7b-hf", arg,
                              "configs/paper/llama2_7b.py")
