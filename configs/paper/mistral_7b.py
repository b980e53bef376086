"""CPI-FT on Mistral-7B-v0.1, one of the paper's base models (arXiv 2508.21741).

Commands (the checkpoint is the user's: ``mistralai/Mistral-7B-v0.1`` in a local directory):

    python -m experiments.plan --config=configs/paper/mistral_7b.py:v4-32     # memory plan, CPU
    python -m experiments.cpift --config=configs/paper/mistral_7b.py:8gpu \\
        --config.model.hf_path=/path/to/Mistral-7B-v0.1 --workdir=workdir/mistral_7b

Runs the benchmark of ``configs/toy.py`` (probes, core masks at p = 1%, clusters at tau = 0.1,
fusion, pipeline SFT, the baselines with multi-stage K = 3, the forgetting pair) on the five
SFT tasks of ``configs.paper.PAPER_TASKS`` with full fine-tuning. Variants ``:v4-32``,
``:v5e-64``, ``:8gpu`` (default); ``experiments/plan.py`` prints whether the step fits.

Architecture: the public ``config.json`` of mistralai/Mistral-7B-v0.1 (7.24e9 parameters,
grouped-query attention with 8 KV heads, a 4096-token sliding window, which the 2048-token
rows never reach). The paper says "Mistral" without a version; v0.1 is the 7B base model of
its time. What the paper leaves open and the defaults chosen: ``configs/paper/__init__.py``.
"""

from configs import paper
from cpift_jax.models.config import ModelConfig

ARCHITECTURE = ModelConfig(
    model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
    max_position_embeddings=32768, rope_theta=10000.0, sliding_window=4096,
    tie_word_embeddings=False, param_dtype="float32", bos_token_id=1, eos_token_id=2,
    pad_token_id=None)


def get_config(arg: str | None = None):
    return paper.paper_config(ARCHITECTURE, "mistralai/Mistral-7B-v0.1", arg,
                              "configs/paper/mistral_7b.py")
