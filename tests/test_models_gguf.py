"""GGUF import on a tiny file written here: names, q/k un-permutation, Q4_1 dequantisation."""

import gguf
import numpy as np
import pytest

from cpift_jax import models
from cpift_jax.models import gguf_import, hf

CONFIG = models.ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            rms_norm_eps=2.0**-10, rope_theta=50000.0, max_position_embeddings=128,
                            bos_token_id=1, eos_token_id=2)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w, heads):
    """llama.cpp's converter: rotate-half rows -> interleaved pairs, per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def q4_1_block(d, m, q):
    """One Q4_1 block: float16 scale d, float16 min m, 32 nibbles (element j | element j+16)."""
    q = np.asarray(q, np.uint8)
    nibbles = q[:16] | (q[16:] << 4)
    return np.concatenate([np.float16(d).reshape(1).view(np.uint8),
                           np.float16(m).reshape(1).view(np.uint8), nibbles])


def handmade_down_proj():
    """HF-layout [32, 64] ffn_down as Q4_1 bytes and its exact values: row r, block b holds
    d = 0.5, m = r - 1, q_j = (j + b) % 16, so value = 0.5 * q_j + r - 1."""
    blocks, values = [], np.zeros((32, 64), np.float32)
    for r in range(32):
        for b in range(2):
            q = (np.arange(32) + b) % 16
            blocks.append(q4_1_block(0.5, r - 1.0, q))
            values[r, 32 * b: 32 * b + 32] = 0.5 * q + r - 1
    return np.stack(blocks).reshape(32, -1), values


def write_gguf(path, tensors, arch="llama"):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(CONFIG.num_hidden_layers)
    writer.add_context_length(CONFIG.max_position_embeddings)
    writer.add_embedding_length(CONFIG.hidden_size)
    writer.add_feed_forward_length(CONFIG.intermediate_size)
    writer.add_head_count(CONFIG.num_attention_heads)
    writer.add_head_count_kv(CONFIG.num_key_value_heads)
    writer.add_rope_freq_base(CONFIG.rope_theta)
    writer.add_layer_norm_rms_eps(CONFIG.rms_norm_eps)
    writer.add_rope_dimension_count(CONFIG.head_dim)
    writer.add_vocab_size(CONFIG.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_tensors(hf_tensors, down_proj_bytes):
    """HF tensors -> llama.cpp names and storage: q/k permuted (F32), MLP gate/up as Q4_1."""
    out = {}
    for name, array in hf_tensors.items():
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = (array, None)
        elif name == "model.norm.weight":
            out["output_norm.weight"] = (array, None)
        elif name == "lm_head.weight":
            out["output.weight"] = (array, None)
        else:
            _, _, layer, *module, leaf = name.split(".")
            kind = GGUF_NAMES[".".join(module)]
            if kind == "attn_q":
                array = llama_cpp_permute(array, CONFIG.num_attention_heads)
            elif kind == "attn_k":
                array = llama_cpp_permute(array, CONFIG.num_key_value_heads)
            raw = None
            if kind in ("ffn_gate", "ffn_up"):
                array, raw = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q4_1), \
                    gguf.GGMLQuantizationType.Q4_1
            if kind == "ffn_down" and layer == "0":
                array, raw = down_proj_bytes, gguf.GGMLQuantizationType.Q4_1
            out[f"blk.{layer}.{kind}.{leaf}"] = (array, raw)
    return out


def test_load_gguf_maps_names_unpermutes_qk_and_dequantises(tmp_path):
    params = models.init_params(CONFIG, 0)
    original = dict(hf.hf_tensors(CONFIG, params))
    down_bytes, down_values = handmade_down_proj()
    write_gguf(tmp_path / "tiny.gguf", gguf_tensors(original, down_bytes))

    config, loaded = gguf_import.load_gguf(tmp_path / "tiny.gguf")
    assert config == CONFIG
    got = dict(hf.hf_tensors(config, loaded))
    for name, array in original.items():
        if name == "model.layers.0.mlp.down_proj.weight":
            np.testing.assert_array_equal(got[name], down_values)
        elif "gate_proj" in name or "up_proj" in name:
            # Q4_1: 16 levels per block of 32, so the error is at most half a step (+ f16 rounding).
            step = np.ptp(array.reshape(-1, 32), axis=1).max() / 15
            assert np.abs(got[name] - array).max() <= step / 2 * 1.01
            assert not np.array_equal(got[name], array)
        else:  # F32 tensors, including the un-permuted q/k, come back exactly
            np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_tied_gguf_has_no_output_tensor(tmp_path):
    config = CONFIG.replace(tie_word_embeddings=True)
    tensors = {n: a for n, a in hf.hf_tensors(config, models.init_params(config, 1))}
    write_gguf(tmp_path / "tied.gguf", gguf_tensors(tensors, handmade_down_proj()[0]))
    loaded_config, params = gguf_import.load_gguf(tmp_path / "tied.gguf")
    assert loaded_config.tie_word_embeddings and "lm_head" not in params
    np.testing.assert_array_equal(params["model"]["embed_tokens"]["embedding"],
                                  tensors["model.embed_tokens.weight"])


def test_unknown_tensor_and_architecture_are_reported(tmp_path):
    tensors = gguf_tensors(dict(hf.hf_tensors(CONFIG, models.init_params(CONFIG, 0))),
                           handmade_down_proj()[0])
    tensors["blk.0.attn_qkv.weight"] = (np.zeros((4, 32), np.float32), None)
    write_gguf(tmp_path / "extra.gguf", tensors)
    with pytest.raises(ValueError, match="unknown GGUF tensor 'blk.0.attn_qkv.weight'"):
        gguf_import.load_gguf(tmp_path / "extra.gguf")
    write_gguf(tmp_path / "gpt2.gguf", {}, arch="gpt2")
    with pytest.raises(ValueError, match="'gpt2'; only 'llama'"):
        gguf_import.load_gguf(tmp_path / "gpt2.gguf")


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of head_dim 4
    permuted = llama_cpp_permute(w, 2)
    np.testing.assert_array_equal(permuted[:4, 0], [0, 6, 3, 9])  # rows 0, 2, 1, 3 of head 0
    np.testing.assert_array_equal(gguf_import.unpermute_rope_rows(permuted, 2), w)
