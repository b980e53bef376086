"""Greedy and sampled generation with a KV cache: jitted, static shapes, per-row prompt lengths.

Prompt layout: ``prompts`` is ``[batch, prompt_len]``, **right-padded**; row ``b``'s prompt is
``prompts[b, :prompt_lengths[b]]`` (any pad value). Each row then continues at its own position
``prompt_lengths[b]``, so no position offsets or left-padding masks are needed: the cache slot of
a token is its position, and a query attends to slots ``<=`` its position. Pad slots of shorter
rows are overwritten by their own generated tokens before anything can attend to them.

Output: the new tokens only, ``[batch, max_new_tokens]`` int32. With ``eos_id`` set, a row stops
at its first EOS and the rest of the row is filled with that EOS id; the loop exits early once
every row has stopped. ``eos_id=None`` always generates ``max_new_tokens``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpift_jax.models.config import ModelConfig
from cpift_jax.models.functional import bind, init_cache


def generate(
    config: ModelConfig,
    params: dict,
    prompts: jax.Array,
    prompt_lengths: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
    eos_id: int | Sequence[int] | None = None,
    top_k: int | None = None,
) -> jax.Array:
    """Continues each prompt by ``max_new_tokens`` tokens using a KV cache (see module doc).

    ``temperature == 0`` is greedy (argmax); otherwise tokens are sampled from
    ``softmax(logits / temperature)``, restricted to the ``top_k`` most likely when given, with
    the key ``fold_in(rng, step)`` at step ``step``.
    """
    args = _check_args(config, prompts, prompt_lengths, max_new_tokens, temperature, rng, eos_id,
                       top_k)
    return _generate_cached(config, params, *args)


def generate_without_cache(
    config: ModelConfig,
    params: dict,
    prompts: jax.Array,
    prompt_lengths: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
    eos_id: int | Sequence[int] | None = None,
    top_k: int | None = None,
) -> jax.Array:
    """Reference for ``generate``: reruns the full forward pass over the whole buffer each step.

    Same arguments and output; quadratic cost, meant for tests.
    """
    args = _check_args(config, prompts, prompt_lengths, max_new_tokens, temperature, rng, eos_id,
                       top_k)
    return _generate_uncached(config, params, *args)


def _check_args(config, prompts, prompt_lengths, max_new_tokens, temperature, rng, eos_id, top_k):
    prompts = jnp.asarray(prompts)
    lengths = jnp.asarray(prompt_lengths)
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(f"prompts must be an int array [batch, prompt_len], got {prompts.dtype} "
                         f"{prompts.shape}")
    if lengths.shape != prompts.shape[:1]:
        raise ValueError(f"prompt_lengths must have shape {prompts.shape[:1]}, got {lengths.shape}")
    if not isinstance(lengths, jax.core.Tracer):
        host = np.asarray(lengths)
        if host.min() < 1 or host.max() > prompts.shape[1]:
            raise ValueError(f"prompt_lengths must lie in [1, {prompts.shape[1]}], got {host}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    temperature = float(temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    if top_k is not None and not 1 <= top_k <= config.vocab_size:
        raise ValueError(f"top_k must lie in [1, vocab_size={config.vocab_size}], got {top_k}")
    if rng is None:
        rng = jax.random.key(0)  # unused by greedy decoding; keeps the jitted signature fixed
    if eos_id is None:
        eos_ids = ()
    elif isinstance(eos_id, (int, np.integer)):
        eos_ids = (int(eos_id),)
    else:
        eos_ids = tuple(int(e) for e in eos_id)
    return (prompts.astype(jnp.int32), lengths.astype(jnp.int32), rng, max_new_tokens,
            temperature, eos_ids, top_k)


def _pick(logits, rng, step, temperature, top_k):
    """Next token from float32 ``[batch, vocab]`` logits."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    return jax.random.categorical(jax.random.fold_in(rng, step), scaled).astype(jnp.int32)


def _is_eos(tokens, eos_ids):
    hit = jnp.zeros(tokens.shape, bool)
    for e in eos_ids:
        hit |= tokens == e
    return hit


_STATIC = ("config", "max_new_tokens", "temperature", "eos_ids", "top_k")


def _decode_loop(first, step_fn, state, max_new_tokens, eos_ids):
    """Shared loop: ``step_fn(step, prev_token, state) -> (token, state)`` for steps 1.."""
    batch = first.shape[0]
    fill = eos_ids[0] if eos_ids else 0
    out = jnp.full((batch, max_new_tokens), fill, jnp.int32).at[:, 0].set(first)
    done = _is_eos(first, eos_ids)

    def cond(carry):
        step, _, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, prev, state, out, done = carry
        token, state = step_fn(step, prev, state)
        token = jnp.where(done, fill, token)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, step))
        return step + 1, token, state, out, done | _is_eos(token, eos_ids)

    carry = (jnp.int32(1), first, state, out, done)
    return jax.lax.while_loop(cond, body, carry)[3]


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_cached(config, params, prompts, lengths, rng, max_new_tokens, temperature, eos_ids,
                     top_k):
    model = bind(config, params)
    batch, prompt_len = prompts.shape
    rows = jnp.arange(batch)
    # The last generated token is never fed back, so prompt_len + max_new_tokens - 1 slots do.
    cache = init_cache(config, batch, prompt_len + max_new_tokens - 1)
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), prompts.shape)
    h, cache = model.hidden_states(prompts, positions, cache)
    first = _pick(model.head(h[rows, lengths - 1]), rng, 0, temperature, top_k)

    def step_fn(step, prev, cache):
        pos = (lengths + step - 1)[:, None]  # position of `prev`, the token generated last
        h, cache = model.hidden_states(prev[:, None], pos, cache)
        return _pick(model.head(h[:, 0]), rng, step, temperature, top_k), cache

    return _decode_loop(first, step_fn, cache, max_new_tokens, eos_ids)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_uncached(config, params, prompts, lengths, rng, max_new_tokens, temperature,
                       eos_ids, top_k):
    model = bind(config, params)
    batch, prompt_len = prompts.shape
    rows = jnp.arange(batch)
    buffer = jnp.zeros((batch, prompt_len + max_new_tokens - 1), jnp.int32)
    buffer = buffer.at[:, :prompt_len].set(prompts)
    first = _pick(model(buffer)[rows, lengths - 1], rng, 0, temperature, top_k)

    def step_fn(step, prev, buffer):
        pos = lengths + step - 1
        buffer = buffer.at[rows, pos].set(prev)
        return _pick(model(buffer)[rows, pos], rng, step, temperature, top_k), buffer

    return _decode_loop(first, step_fn, buffer, max_new_tokens, eos_ids)
