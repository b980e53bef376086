"""Llama-family decoders in Flax NNX, with Hugging Face import/export.

Functional API (the library never needs a module object)::

    config = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    params = init_params(config, seed=0)          # plain nested dict, HF-like leaf paths
    out = logits(config, params, tokens)          # float32 [batch, seq, vocab]
    new = generate(config, params, prompts, prompt_lengths, max_new_tokens=16)

``cpift_jax.models.hf`` loads/saves HF safetensors checkpoints; ``cpift_jax.models.smollm2``
fetches and loads the SmolLM2-135M-Instruct model.
"""

from cpift_jax.models.config import (
    SUPPORTED_MODEL_TYPES,
    SUPPORTED_ROPE_TYPES,
    ModelConfig,
)
from cpift_jax.models.functional import abstract_params, bind, init_cache, init_params, logits
from cpift_jax.models.generate import generate, generate_without_cache
from cpift_jax.models.llama import LlamaForCausalLM

__all__ = [
    "ModelConfig",
    "SUPPORTED_MODEL_TYPES",
    "SUPPORTED_ROPE_TYPES",
    "LlamaForCausalLM",
    "init_params",
    "abstract_params",
    "bind",
    "logits",
    "init_cache",
    "generate",
    "generate_without_cache",
]
