"""Functional entry points: the library holds ``(config, params)``, never a module object.

``params`` is the plain nested dict ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (layer
indices are int keys, so leaf paths read ``model/layers/0/mlp/up_proj/kernel``; see
``cpift_jax.models.llama`` for the full layout). ``bind`` turns it back into a module inside a
trace; the module graph is built once per config with ``nnx.eval_shape`` and cached.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from cpift_jax import tree
from cpift_jax.models.config import ModelConfig
from cpift_jax.models.llama import KVCache, LlamaForCausalLM


def init_params(config: ModelConfig, seed: int) -> dict:
    """Random parameters as a plain nested dict (HF initialisation: N(0, 0.02), norms 1).

    Deterministic per ``seed`` and bit-identical to the state of
    ``LlamaForCausalLM(config, rngs=nnx.Rngs(seed))`` (built eagerly: a jitted init draws
    slightly different normals).
    """
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@functools.lru_cache(maxsize=32)
def _graph(config: ModelConfig):
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def abstract_params(config: ModelConfig) -> dict:
    """``jax.ShapeDtypeStruct`` pytree with the exact structure ``init_params`` returns."""
    return _graph(config)[1]


def bind(config: ModelConfig, params: dict) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` whose parameters are ``params`` (works on tracers inside jit).

    Raises ``ValueError`` naming the first leaf whose presence or shape differs from
    ``abstract_params(config)``. Dtypes are not checked: the layers compute in the dtype of the
    parameters they are given.
    """
    graphdef, abstract = _graph(config)
    tree.check_same_shapes(abstract, params, names=("model", "params"))
    return nnx.merge(graphdef, params)


@functools.partial(jax.jit, static_argnames="config")
def logits(config: ModelConfig, params: dict, tokens: jax.Array, *,
           segment_ids: jax.Array | None = None, positions: jax.Array | None = None
           ) -> jax.Array:
    """Causal LM logits, float32 ``[batch, seq, vocab]``, positions ``0..seq-1``.

    Right padding is harmless (a token never attends to later positions); mask the loss.
    Packed rows (``cpift_jax.data.packing``) pass their ``segment_ids`` and ``positions``
    (int ``[batch, seq]``): each document then attends only to itself, with its own positions.
    """
    return bind(config, params)(tokens, positions, segment_ids)


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    """An all-zero KV cache for ``length`` positions, in the parameter dtype by default."""
    dtype = jnp.dtype(dtype or config.param_dtype)
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    return [
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        for _ in range(config.num_hidden_layers)
    ]
