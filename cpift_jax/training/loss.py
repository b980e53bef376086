"""Masked next-token cross-entropy, from full logits or in vocabulary chunks.

``chunked_nll`` computes ``sum_i m_i * (logsumexp_v(h_i . w_v) - h_i . w_{t_i})`` from the
hidden states ``h`` and the output projection ``w`` ``[hidden, vocab]`` without ever holding the
float32 logits of the whole vocabulary: a ``lax.scan`` over vocabulary chunks keeps a running
maximum ``m``, a running ``s = sum exp(logit - m)`` (rescaled by ``exp(m_old - m_new)`` when the
maximum grows; the online softmax of Milakov & Gimelshein 2018) and the target's logit, picked in
the chunk that holds it. ``jax.checkpoint`` around the chunk body makes the backward pass
recompute a chunk's logits instead of keeping all of them. A vocabulary that the chunk size does
not divide ends with a chunk that overlaps the one before (it starts at ``vocab - chunk``); its
columns already counted are masked to ``-inf``, so nothing is padded into the model.

``masked_cross_entropy`` is the plain formula on full logits, kept as the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpift_jax.models.layers import softcap

__all__ = ["masked_cross_entropy", "chunked_nll"]


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """(mean NLL over ``mask``, number of masked tokens); float32 throughout."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    count = m.sum()
    return (nll * m).sum() / jnp.maximum(count, 1.0), count


def _chunk_logits(hidden, kernel, start, size, cap):
    """float32 logits of vocabulary columns ``start .. start + size - 1``, soft-capped
    (``cap * tanh(x / cap)``, Gemma-2) when ``cap`` is set: the cap acts on each logit alone,
    so capping chunk by chunk is exact."""
    columns = jax.lax.dynamic_slice_in_dim(kernel, start, size, axis=1)
    logits = jnp.dot(hidden, columns, preferred_element_type=jnp.float32)
    return logits if cap is None else softcap(logits, cap)


def chunked_nll(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, mask: jax.Array,
                chunk: int = 0, softcap_at: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum of the masked NLL, number of masked tokens), float32 scalars.

    Args:
      hidden: ``[..., hidden]`` final hidden states (any float dtype; the logits are float32).
      kernel: ``[hidden, vocab]`` output projection.
      targets: int ``[...]`` next-token ids; mask: bool ``[...]`` (True = counted).
      chunk: vocabulary columns per chunk; 0 or >= vocab: one chunk (full logits).
      softcap_at: the model's final-logit soft-cap (``ModelConfig.final_logit_softcapping``).
    """
    vocab = kernel.shape[1]
    rows = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).astype(jnp.int32)
    mask = mask.reshape(-1)
    if chunk < 0:
        raise ValueError(f"vocab_chunk must be >= 0, got {chunk}")
    size = vocab if chunk == 0 or chunk >= vocab else chunk
    count = mask.astype(jnp.float32).sum()

    if size == vocab:
        logits = _chunk_logits(rows, kernel, 0, vocab, softcap_at)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
        return jnp.where(mask, lse - picked, 0.0).sum(), count

    @jax.checkpoint
    def body(carry, index):
        running_max, running_sum, picked = carry
        first_new = index * size  # columns before it belong to earlier chunks
        start = jnp.minimum(first_new, vocab - size)
        logits = _chunk_logits(rows, kernel, start, size, softcap_at)
        columns = start + jnp.arange(size, dtype=jnp.int32)
        fresh = columns >= first_new
        logits = jnp.where(fresh[None, :], logits, -jnp.inf)
        # The maximum only keeps exp() in range: the result does not depend on it, so its
        # gradient is not needed (and a tie would make it ill-defined).
        new_max = jax.lax.stop_gradient(jnp.maximum(running_max, logits.max(axis=-1)))
        running_sum = (running_sum * jnp.exp(running_max - new_max)
                       + jnp.exp(logits - new_max[:, None]).sum(axis=-1))
        hit = (columns[None, :] == targets[:, None]) & fresh[None, :]
        picked = picked + jnp.where(hit, logits, 0.0).sum(axis=-1)
        return (new_max, running_sum, picked), None

    n = rows.shape[0]
    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32),
            jnp.zeros((n,), jnp.float32))
    num_chunks = -(-vocab // size)
    (running_max, running_sum, picked), _ = jax.lax.scan(
        body, init, jnp.arange(num_chunks, dtype=jnp.int32))
    nll = running_max + jnp.log(running_sum) - picked
    return jnp.where(mask, nll, 0.0).sum(), count
