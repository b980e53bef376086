"""Flax NNX Llama-family decoder (Llama 1/2/3, Mistral, Qwen2, Gemma-2) from one ``ModelConfig``.

Pre-norm decoder (Touvron et al. 2023): ``h += Attn(RMSNorm(h)); h += SwiGLU(RMSNorm(h))`` with
rotary position embeddings and grouped-query attention (``layers.causal_attention`` for
training-style calls, ``jax.nn.dot_product_attention`` with explicit masks otherwise).

Gemma-2 (Gemma Team 2024) is the same decoder with the options of ``ModelConfig``:
``h = sqrt(d) * embed(tokens)``; per layer ``h += RMSNorm(Attn(RMSNorm(h)))`` and
``h += RMSNorm(GeGLU(RMSNorm(h)))`` (the "sandwich" norms, gain ``1 + weight``); attention scores
``q.k * query_pre_attn_scalar**-0.5`` soft-capped before the mask, every other layer limited to
a sliding window (``config.layer_windows``); logits soft-capped. All its attention goes through
``layers.grouped_attention`` (the cap is inside the softmax).
Attribute names follow transformers' ``LlamaForCausalLM`` so a
parameter's path is its HF tensor name with "." -> "/" and ``weight`` -> ``kernel`` (transposed,
for linears) or ``embedding`` (for the token embedding):

    model/embed_tokens/embedding                   [vocab, hidden]
    model/layers/{i}/input_layernorm/weight        [hidden]
    model/layers/{i}/self_attn/{q,k,v,o}_proj/kernel   [in, out]   (+ /bias when enabled)
    model/layers/{i}/post_attention_layernorm/weight   [hidden]
    model/layers/{i}/{pre,post}_feedforward_layernorm/weight  [hidden]   (sandwich_norms only)
    model/layers/{i}/mlp/{gate,up,down}_proj/kernel    [in, out]   (+ /bias when enabled)
    model/norm/weight                              [hidden]
    lm_head/kernel                                 [hidden, vocab]  (only when untied)

A KV cache is an explicit argument (a list with one ``{"k", "v"}`` dict of
``[batch, cache_len, kv_heads, head_dim]`` arrays per layer), so the module stays stateless and
generation is a pure function; see ``cpift_jax.models.generate``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cpift_jax.models.config import ModelConfig
from cpift_jax.models.layers import (RMSNorm, apply_rope, attention_mask, causal_attention,
                                     grouped_attention, rope_cos_sin, scale_embedding,
                                     segment_attention_mask, softcap)

KVCache = list  # [{"k": [B, S, K, H], "v": [B, S, K, H]}] * num_hidden_layers

_INIT_STD = 0.02  # transformers' default initializer_range


def _linear(config: ModelConfig, n_in: int, n_out: int, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    dtype = jnp.dtype(config.param_dtype)
    return nnx.Linear(
        n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype,
        kernel_init=nnx.initializers.normal(_INIT_STD), bias_init=nnx.initializers.zeros,
        rngs=rngs,
    )


def _rms_norm(config: ModelConfig) -> RMSNorm:
    return RMSNorm(config.hidden_size, config.rms_norm_eps,
                   param_dtype=jnp.dtype(config.param_dtype), unit_offset=config.norm_unit_offset)


class Attention(nnx.Module):
    """Multi-head attention with GQA and RoPE; optional KV cache written at ``positions``.

    ``window`` is this layer's attention window (``config.layer_windows``; None: full causal).
    ``segment_ids`` (``[batch, seq]`` ints, packed rows; no cache) limits each query to the keys
    of its own document (``layers.segment_attention_mask``); None keeps the unpacked code.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        q_size, kv_size = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = _linear(c, c.hidden_size, q_size, c.attention_bias, rngs)
        self.k_proj = _linear(c, c.hidden_size, kv_size, c.attention_bias, rngs)
        self.v_proj = _linear(c, c.hidden_size, kv_size, c.attention_bias, rngs)
        self.o_proj = _linear(c, q_size, c.hidden_size, c.attention_out_bias, rngs)

    def __call__(self, x, cos, sin, positions, cache, window, segment_ids=None):
        c = self.config
        batch, seq, _ = x.shape
        x = _rows(x)
        q = self.q_proj(x).reshape(batch, seq, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x).reshape(batch, seq, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x).reshape(batch, seq, c.num_key_value_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) cannot be used with a KV cache")
            out = grouped_attention(q, k, v, segment_attention_mask(segment_ids, window),
                                    scale=c.attention_scale,
                                    softcap_at=c.attn_logit_softcapping)
            new_cache = None
        elif cache is None:
            if positions is None and (window is None or self._gemma_scores):
                out = causal_attention(q, k, v, window=window, **self._score_options())
            else:
                pos = positions if positions is not None else _default_positions(batch, seq)
                out = self._attend(q, k, v, attention_mask(pos, pos, window))
            new_cache = None
        else:
            # Each row writes its new keys/values at its own positions (per-row prompt lengths).
            rows = jnp.arange(batch)[:, None]
            k_all = cache["k"].at[rows, positions].set(k.astype(cache["k"].dtype))
            v_all = cache["v"].at[rows, positions].set(v.astype(cache["v"].dtype))
            slots = jnp.arange(k_all.shape[1])[None, :]
            mask = attention_mask(positions, slots, window)
            out = self._attend(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask)
            new_cache = {"k": k_all, "v": v_all}
        return self.o_proj(out.reshape(batch * seq, -1)).reshape(batch, seq, -1), new_cache

    @property
    def _gemma_scores(self) -> bool:
        """Whether the scores need Gemma-2's scale or cap (not expressible in
        ``jax.nn.dot_product_attention``)."""
        c = self.config
        return c.attn_logit_softcapping is not None or c.query_pre_attn_scalar is not None

    def _score_options(self) -> dict:
        if not self._gemma_scores:
            return {}
        return {"scale": self.config.attention_scale,
                "softcap_at": self.config.attn_logit_softcapping}

    def _attend(self, q, k, v, mask):
        if self._gemma_scores:
            return grouped_attention(q, k, v, mask, **self._score_options())
        return jax.nn.dot_product_attention(q, k, v, mask=mask)


class MLP(nnx.Module):
    """Gated feed-forward (Shazeer 2020): ``down(act(gate(x)) * up(x))``, SwiGLU with
    ``act = silu``, GeGLU with ``act = gelu`` (tanh approximation, ``gelu_pytorch_tanh``)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        self.hidden_act = c.hidden_act
        self.gate_proj = _linear(c, c.hidden_size, c.intermediate_size, c.mlp_bias, rngs)
        self.up_proj = _linear(c, c.hidden_size, c.intermediate_size, c.mlp_bias, rngs)
        self.down_proj = _linear(c, c.intermediate_size, c.hidden_size, c.mlp_bias, rngs)

    def __call__(self, x):
        rows = _rows(x)
        gate = self.gate_proj(rows)
        if self.hidden_act == "gelu_pytorch_tanh":
            gate = jax.nn.gelu(gate, approximate=True)
        else:
            gate = jax.nn.silu(gate)
        out = self.down_proj(gate * self.up_proj(rows))
        return out.reshape(x.shape[:-1] + out.shape[-1:])


class DecoderLayer(nnx.Module):
    """One block; ``window`` is its attention window (``config.layer_windows[i]``).

    Pre-norm (Llama): ``post_attention_layernorm`` normalises the MLP's input. With
    ``sandwich_norms`` (Gemma-2) it normalises the attention output instead, and
    ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` wrap the MLP.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.sandwich_norms = config.sandwich_norms
        self.input_layernorm = _rms_norm(config)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = _rms_norm(config)
        if config.sandwich_norms:
            self.pre_feedforward_layernorm = _rms_norm(config)
            self.post_feedforward_layernorm = _rms_norm(config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, h, cos, sin, positions, cache, window, segment_ids=None):
        attn, new_cache = self.self_attn(self.input_layernorm(h), cos, sin, positions, cache,
                                         window, segment_ids)
        if self.sandwich_norms:
            h = h + self.post_attention_layernorm(attn)
            h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        else:
            h = h + attn
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h, new_cache


class LlamaModel(nnx.Module):
    """Embedding, decoder stack and final norm (HF ``LlamaModel``)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.param_dtype)
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype,
            embedding_init=nnx.initializers.normal(_INIT_STD), rngs=rngs,
        )
        self.layers = nnx.List(
            [DecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.norm = _rms_norm(config)


class LlamaForCausalLM(nnx.Module):
    """Causal LM over ``ModelConfig``; ``__call__(tokens) -> float32 logits [batch, seq, vocab]``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config, config.hidden_size, config.vocab_size, False, rngs)

    def hidden_states(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states ``[batch, seq, hidden]`` and the updated cache.

        ``positions`` (``[batch, seq]`` ints) default to ``0..seq-1``; with a ``cache`` they are
        also the cache slots written, and each query attends to all slots ``<=`` its position.
        ``segment_ids`` (``[batch, seq]`` ints, packed rows from ``cpift_jax.data.packing``;
        no cache) make a key visible only within its query's document; pass the rows'
        per-document ``positions`` with them.
        """
        batch, seq = tokens.shape
        if cache is not None and positions is None:
            raise ValueError("a KV cache needs explicit positions (the cache slots to write)")
        pos = positions if positions is not None else _default_positions(batch, seq)
        cos, sin = rope_cos_sin(self.config, pos)
        h = scale_embedding(self.config, self.model.embed_tokens(tokens))
        new_cache = [] if cache is not None else None
        windows = self.config.layer_windows
        for i, layer in enumerate(self.model.layers):
            h, layer_cache = layer(h, cos, sin, positions, None if cache is None else cache[i],
                                   windows[i], segment_ids)
            if cache is not None:
                new_cache.append(layer_cache)
        return self.model.norm(h), new_cache

    def head(self, h: jax.Array) -> jax.Array:
        """Float32 logits from final hidden states (tied: ``h @ embed_tokens^T``), soft-capped
        when ``config.final_logit_softcapping`` is set."""
        rows = _rows(h)
        if self.config.tie_word_embeddings:
            out = self.model.embed_tokens.attend(rows)
        else:
            out = self.lm_head(rows)
        out = out.reshape(h.shape[:-1] + out.shape[-1:]).astype(jnp.float32)
        if self.config.final_logit_softcapping is not None:
            out = softcap(out, self.config.final_logit_softcapping)
        return out

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        return self.head(self.hidden_states(tokens, positions, segment_ids=segment_ids)[0])


def _rows(x: jax.Array) -> jax.Array:
    """``[..., features]`` -> ``[rows, features]``. Projections run on 2-D activations because
    XLA:CPU's weight-gradient dot contracting over (batch, seq) together measured ~1.6x slower
    than the same dot over one flattened axis."""
    return x.reshape(-1, x.shape[-1])


def _default_positions(batch: int, seq: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None, :], (batch, seq))
