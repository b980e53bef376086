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
