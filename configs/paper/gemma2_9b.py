"""CPI-FT on Gemma-2-9B, one of the paper's base models (arXiv 2508.21741).

Commands (the checkpoint is the user's: ``google/gemma-2-9b`` in a local directory):

    python -m experiments.plan --config=configs/paper/gemma2_9b.py:v4-32     # memory plan, CPU
    python -m experiments.cpift --config=configs/paper/gemma2_9b.py:8gpu \\
        --config.model.hf_path=/path/to/gemma-2-9b --workdir=workdir/gemma2_9b

Runs the benchmark of ``configs/toy.py`` (probes, core masks at p = 1%, clusters at tau = 0.1,
fusion, pipeline SFT, the baselines with multi-stage K = 3, the forgetting pair) on the five
SFT tasks of ``configs.paper.PAPER_TASKS`` with full fine-tuning. Variants ``:v4-32``,
``:v5e-64``, ``:8gpu`` (default); ``experiments/plan.py`` prints whether the step fits.

Architecture: the public ``config.json`` of google/gemma-2-9b (model_type ``gemma2``; 9.24e9
parameters, 0.92e9 of them in the 256000-row embedding, which is tied to the output head;
GeGLU MLP, sandwich RMSNorms with a ``1 + weight`` gain, embeddings scaled by
``sqrt(hidden_size)``, grouped-query attention with 8 KV heads of dimension 256 and scores
scaled by ``query_pre_attn_scalar**-0.5``, attention and final logits soft-capped at 50 and 30,
local layers with a 4096-token window alternating with global ones, starting local). The
2048-token rows never reach the window. The paper says "Gemma" without a size or version;
Gemma-2-9B base is the one near the other models' 7B. What the paper leaves open and the
defaults chosen: ``configs/paper/__init__.py``.
"""

from configs import paper
from cpift_jax.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig

NUM_LAYERS = 42

ARCHITECTURE = ModelConfig(
    model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
    num_hidden_layers=NUM_LAYERS, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
    rms_norm_eps=1e-6, max_position_embeddings=8192, rope_theta=10000.0,
    sliding_window=4096,
    layer_types=tuple(SLIDING_ATTENTION if i % 2 == 0 else FULL_ATTENTION
                      for i in range(NUM_LAYERS)),
    hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0, sandwich_norms=True, norm_unit_offset=True,
    scale_embeddings=True, tie_word_embeddings=True, param_dtype="float32", bos_token_id=2,
    eos_token_id=1, pad_token_id=0)


def get_config(arg: str | None = None):
    return paper.paper_config(ARCHITECTURE, "google/gemma-2-9b", arg,
                              "configs/paper/gemma2_9b.py")
