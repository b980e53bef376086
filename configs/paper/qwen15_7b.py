"""CPI-FT on Qwen1.5-7B, one of the paper's base models (arXiv 2508.21741).

Commands (the checkpoint is the user's: ``Qwen/Qwen1.5-7B`` in a local directory):

    python -m experiments.plan --config=configs/paper/qwen15_7b.py:v4-32     # memory plan, CPU
    python -m experiments.cpift --config=configs/paper/qwen15_7b.py:8gpu \\
        --config.model.hf_path=/path/to/Qwen1.5-7B --workdir=workdir/qwen15_7b

Runs the benchmark of ``configs/toy.py`` (probes, core masks at p = 1%, clusters at tau = 0.1,
fusion, pipeline SFT, the baselines with multi-stage K = 3, the forgetting pair) on the five
SFT tasks of ``configs.paper.PAPER_TASKS`` with full fine-tuning. Variants ``:v4-32``,
``:v5e-64``, ``:8gpu`` (default); ``experiments/plan.py`` prints whether the step fits.

Architecture: the public ``config.json`` of Qwen/Qwen1.5-7B (model_type ``qwen2``: q/k/v
biases, RoPE theta 1e6, no sliding window; 7.72e9 parameters, 1.24e9 of them in the untied
151936-row embedding and head). The paper says "Qwen1.5-7B" without base or chat; the base
model is chosen, as for the other models. What the paper leaves open and the defaults chosen:
``configs/paper/__init__.py``.
"""

from configs import paper
from cpift_jax.models.config import ModelConfig

ARCHITECTURE = ModelConfig(
    model_type="qwen2", vocab_size=151936, hidden_size=4096, intermediate_size=11008,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
    max_position_embeddings=32768, rope_theta=1000000.0, attention_bias=True,
    tie_word_embeddings=False, param_dtype="float32", bos_token_id=151643,
    eos_token_id=151643, pad_token_id=None)


def get_config(arg: str | None = None):
    return paper.paper_config(ARCHITECTURE, "Qwen/Qwen1.5-7B", arg,
                              "configs/paper/qwen15_7b.py")
