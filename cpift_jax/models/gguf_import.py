"""Read a llama.cpp GGUF file of a Llama-architecture model into our ``(config, params)``.

Quantised tensors (Q4_1, Q8_0, ...) are dequantised to float32 with ``gguf.quants``. Two
llama.cpp conventions are undone on the way:

* tensor names: ``blk.{i}.attn_q.weight`` -> ``model.layers.{i}.self_attn.q_proj.weight`` etc.;
* q/k rows: llama.cpp's converter permutes each head's rows from rotate-half order to
  interleaved-pair order (``reshape(heads, 2, d/2, in).swapaxes(1, 2)``); we apply the inverse
  ``reshape(heads, d/2, 2, in).swapaxes(1, 2)`` so RoPE is rotate-half again as in HF.
"""

from __future__ import annotations

import os
import re

import numpy as np

from cpift_jax.models.config import ModelConfig
from cpift_jax.models.hf import params_from_tensors

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> HF Llama tensor name (``ValueError`` if unknown)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, kind, leaf = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{leaf}"
    raise ValueError(f"unknown GGUF tensor '{gguf_name}' for the llama architecture")


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (see module docstring); ``weight`` [out, in]."""
    out_dim = weight.shape[0]
    head_dim = out_dim // heads
    rest = weight.shape[1:]
    return (weight.reshape(heads, head_dim // 2, 2, *rest).swapaxes(1, 2)
            .reshape(out_dim, *rest))


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF metadata key '{key}' is missing")
        return default
    return field.contents()


def config_from_gguf(reader, *, param_dtype: str = "float32") -> ModelConfig:
    """``ModelConfig`` from the ``llama.*`` and ``tokenizer.ggml.*`` metadata of a GGUF file."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF general.architecture is {arch!r}; only 'llama' is supported")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"GGUF llama.rope.scaling.type {scaling!r} is not supported")
    tensor_names = {t.name for t in reader.tensors}
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    vocab = _field(reader, "llama.vocab_size", 0) or len(reader.fields["tokenizer.ggml.tokens"].data)

    def token_id(key):
        field = reader.fields.get(key)
        return None if field is None else int(field.contents())

    return ModelConfig(
        model_type="llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        param_dtype=param_dtype,
        bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_token_id=token_id("tokenizer.ggml.eos_token_id"),
        pad_token_id=token_id("tokenizer.ggml.padding_token_id"),
    )


def load_gguf(path: str | os.PathLike, *, param_dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """GGUF file -> ``(ModelConfig, params)``, dequantising one tensor at a time."""
    import gguf  # imported here: only GGUF users need it

    reader = gguf.GGUFReader(os.fspath(path))
    config = config_from_gguf(reader, param_dtype=param_dtype)
    by_name = {hf_name(t.name): t for t in reader.tensors}

    def get_tensor(name: str) -> np.ndarray:
        t = by_name[name]
        # GGUF lists dims fastest-first; dequantize returns numpy (row-major) order = HF [out, in].
        array = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        array = array.reshape(tuple(int(d) for d in reversed(t.shape)))
        if name.endswith("self_attn.q_proj.weight"):
            array = unpermute_rope_rows(array, config.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            array = unpermute_rope_rows(array, config.num_key_value_heads)
        return array

    return config, params_from_tensors(config, get_tensor, set(by_name), source=os.fspath(path))
