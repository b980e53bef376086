"""Building blocks of a Llama-family decoder: RMSNorm, rotary embeddings, attention masks.

Every formula mirrors transformers' ``modeling_llama.py`` so float32 logits agree to ~1e-6:
RMSNorm in float32, RoPE inverse frequencies in float32, rotate-half (not interleaved) RoPE.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpift_jax.models.config import ModelConfig


class RMSNorm(nnx.Module):
    """``y = weight * x / sqrt(mean(x^2) + eps)`` (Zhang & Sennrich 2019), statistics in float32.

    The parameter is called ``weight`` (not nnx's ``scale``) so its path matches the HF tensor.
    """

    def __init__(self, size: int, eps: float, *, param_dtype):
        self.weight = nnx.Param(jnp.ones((size,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
        return self.weight[...] * normed


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """RoPE inverse frequencies ``theta^(-2i/d)`` (Su et al. 2021), float32 as in transformers.

    ``linear`` divides every frequency by ``factor``; ``llama3`` (Llama 3.1 report) divides only
    the low frequencies and interpolates smoothly in between.
    """
    dim = config.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponent)).astype(np.float32)
    if config.rope_type == "linear":
        return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
    if config.rope_type == "llama3":
        factor = config.rope_factor
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[batch, seq, head_dim]`` for integer ``positions`` ``[batch, seq]``."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``x`` ``[batch, seq, heads, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def attention_mask(
    query_positions: jax.Array, key_positions: jax.Array, sliding_window: int | None
) -> jax.Array:
    """Boolean ``[batch, 1, q, k]``: key visible iff ``q - window < k <= q`` (causal).

    ``query_positions`` is ``[batch, q]``, ``key_positions`` ``[batch or 1, k]`` (a cache slot's
    index is its position).
    """
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    visible = k <= q
    if sliding_window is not None:
        visible &= k > q - sliding_window
    return visible[:, None, :, :]


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Causal grouped-query attention ``softmax(q k^T / sqrt(d) + causal) v`` over
    ``q`` ``[batch, seq, heads, head_dim]`` and ``k``, ``v`` ``[batch, seq, kv_heads, head_dim]``
    (Vaswani et al. 2017; GQA: Ainslie et al. 2023), scores and softmax in float32.

    Same values as ``jax.nn.dot_product_attention(q, k, v, is_causal=True)``; written out so
    that every dot has its batch dimensions leading: the query groups sharing a KV head are
    stacked into one ``[groups * seq, head_dim]`` matrix per (batch, kv head), and XLA:CPU
    then needs no transposes of the score tensors (measured 1.3x faster forward + backward
    at the 10M benchmark's shapes).
    """
    batch, seq, heads, dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    # [batch, kv_heads, groups * seq, dim]: query row r is position r % seq of group r // seq.
    qg = q.reshape(batch, seq, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4)
    qg = qg.reshape(batch, kv_heads, groups * seq, dim)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bksd->bkqs", qg, kt, preferred_element_type=jnp.float32)
    scores = scores * np.float32(1.0 / math.sqrt(dim))
    query_pos = jnp.tile(jnp.arange(seq), groups)
    visible = query_pos[:, None] >= jnp.arange(seq)[None, :]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vt).reshape(batch, kv_heads, groups, seq, dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, dim)
