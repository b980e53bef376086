"""DARE: drop and rescale task vectors at random, then merge them linearly or with TIES.

Yu et al., 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models
as a Free Lunch" (ICML).

1. Task vectors delta_i = theta_i - base.
2. Drop: keep each entry independently with probability 1 - ``drop_rate`` (p).
3. Rescale the kept entries, per leaf and task:
   ``rescale="inverse"``: by 1 / (1 - p), the paper's choice (unbiased in expectation);
   ``"norm"``: by ||delta|| / ||dropped delta|| so the leaf keeps its L2 norm (the
   norm-matching alternative; 0 if nothing was kept); ``"none"``: no rescaling.
4. Combine: ``combine="linear"`` gives base + scale * sum_i w_i dropped_i (DARE + task
   arithmetic); ``"ties"`` elects signs and takes the disjoint mean (DARE-TIES, no trimming).

Randomness: ``seed`` (int, default 0) gives ``jax.random.key(seed)``, folded with the model
index and then the leaf index: one key per (task, leaf) stream, so every leaf of every task
draws its own mask and a result is reproducible from the seed alone. Within a stream, entry e
is kept when hash(key, e) / 2^24 >= p, a counter-based draw (``keep_mask``: two rounds of a
32-bit integer mix, 24-bit uniforms) that XLA fuses into the merge at a few operations per
entry; ``jax.random.bernoulli`` (threefry) costs ~20 ns per entry on CPU, more than the rest of
the merge. The draws are not cryptographic and not ``jax.random``'s stream; leaves must hold
fewer than 2^32 entries.
Defaults: ``drop_rate=0.9`` (the paper shows SFT deltas
survive p = 0.9), ``rescale="inverse"``, ``combine="linear"``, ``scale=1.0``, weights 1 each.
``drop_rate`` and ``scale`` may be per-leaf pytrees. Float32 inside, the input dtype out.
Degenerate cases: ``drop_rate=0`` is plain task arithmetic / TIES without trimming;
``drop_rate=1`` drops everything and returns base; zero task vectors stay zero (no NaN from
the norm rescaling).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpift_jax.merges import _task_vectors as tv
from cpift_jax.merges._common import leaf_program

REQUIRES_BASE = True
MIN_MODELS = 1
MAX_MODELS = None
STOCHASTIC = True
EXAMPLE_HPARAMS = {"drop_rate": 0.5, "seed": 3}
PER_LEAF_HPARAMS = ("drop_rate", "scale")
INTERPOLATION_ENDPOINTS = (
    ({"weights": (1.0, 0.0), "drop_rate": 0.0}, 0),
    ({"weights": (0.0, 1.0), "drop_rate": 0.0}, 1),
    ({"weights": (1.0, 0.0), "drop_rate": 0.0, "combine": "ties"}, 0),
)
RESCALES = ("inverse", "norm", "none")



@functools.partial(jax.jit, static_argnums=(1, 2))
def _stream_keys(seed, n_models: int, n_leaves: int) -> jax.Array:
    key = jax.random.key(seed)

    def words(i, j):
        data = jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, i), j))
        return data.reshape(-1)[:2].astype(jnp.uint32)

    per_leaf = jax.vmap(words, in_axes=(None, 0))
    return jax.vmap(per_leaf, in_axes=(0, None))(jnp.arange(n_models), jnp.arange(n_leaves))


def stream_keys(seed: int, n_models: int, n_leaves: int) -> jax.Array:
    """uint32 (n_models, n_leaves, 2): the key of every (task, leaf) stream, from
    ``jax.random.key(seed)`` folded with the task index and then the leaf index."""
    return _stream_keys(int(seed), n_models, n_leaves)


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser (xorshift-multiply, two rounds of constants found by
    search for low bias): every output bit depends on every input bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def keep_mask(shape, key: jax.Array, drop_rate) -> jax.Array:
    """Bernoulli(1 - drop_rate) per entry: uniform u = hash(key, index) / 2^24 in [0, 1),
    kept where u >= drop_rate (so 0 keeps all, 1 drops all; 24-bit resolution)."""
    size = math.prod(shape)
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    bits = _mix(_mix(index + key[0]) ^ key[1])
    uniform = (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
    return uniform >= drop_rate


def drop_and_rescale(delta: jax.Array, key: jax.Array, drop_rate, rescale: str) -> jax.Array:
    """One task vector leaf with entries dropped with probability ``drop_rate``, rescaled."""
    dropped = jnp.where(keep_mask(delta.shape, key, drop_rate), delta, 0.0)
    if rescale == "inverse":
        return dropped * jnp.where(drop_rate < 1.0, 1.0 / jnp.maximum(1.0 - drop_rate, 1e-30), 0.0)
    if rescale == "norm":
        before, after = jnp.sqrt(jnp.sum(delta * delta)), jnp.sqrt(jnp.sum(dropped * dropped))
        return dropped * jnp.where(after > 0, before / jnp.where(after > 0, after, 1.0), 0.0)
    return dropped


def _dropped(models, base, keys, drop_rate, rescale):
    return [drop_and_rescale(d, keys[i], drop_rate, rescale)
            for i, d in enumerate(tv.deltas(models, base))]


@leaf_program(static_argnames=("rescale", "combine", "sign_method"))
def merge_leaf(base, models, keys, drop_rate, w, scale, *, rescale="inverse", combine="linear",
               sign_method="sum"):
    """One leaf: drop and rescale every task vector, combine, add to base."""
    parts = _dropped(models, base, keys, drop_rate, rescale)
    return tv.add_to_base(base, tv.combine(parts, w, combine, sign_method), scale)


@leaf_program(static_argnames=("rescale",))
def _dropped_stack(base, models, keys, drop_rate, *, rescale):
    return jnp.stack(_dropped(models, base, keys, drop_rate, rescale))


def dropped_task_vectors(inputs: tv.FlatInputs, drop_rates, rescale: str, seed: int):
    """Per-leaf ``(n, *shape)`` stacks of dropped-and-rescaled task vectors (as ``merge``
    draws them)."""
    keys = stream_keys(seed, len(inputs.models[0]), len(inputs.paths))
    return [
        _dropped_stack(b, xs, keys[:, j], np.float32(p), rescale=rescale)
        for j, (xs, b, p) in enumerate(zip(inputs.models, inputs.base, drop_rates))
    ]


def merge(
    models: Sequence,
    *,
    base=None,
    weights: Sequence[float] | None = None,
    drop_rate=0.9,
    rescale: str = "inverse",
    combine: str = "linear",
    scale=1.0,
    sign_method: str = "sum",
    seed: int = 0,
    donate: bool = False,
):
    """``donate=True``: the caller gives up ``base`` (its buffers may hold the result)."""
    inputs = tv.flat_inputs(models, base, operator="dare", require_base=True)
    tv.check_choice(rescale, "rescale", RESCALES)
    tv.check_choice(combine, "combine", tv.COMBINE_METHODS)
    tv.check_choice(sign_method, "sign_method", tv.SIGN_METHODS)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be a Python int, got {seed!r}")
    w = tv.float32s(tv.task_weights(weights, len(models), nonnegative=combine == "ties"))
    drop_rates = tv.check_per_leaf(
        inputs.per_leaf(drop_rate, "drop_rate"), inputs.paths, "drop_rate",
        lambda p: 0.0 <= p <= 1.0, "in [0, 1]",
    )
    scales = tv.check_per_leaf(
        inputs.per_leaf(scale, "scale"), inputs.paths, "scale", math.isfinite, "finite"
    )
    keys = stream_keys(seed, len(models), len(inputs.paths))
    return tv.run_leaves(
        merge_leaf, inputs,
        lambda j: (keys[:, j], np.float32(drop_rates[j]), w, np.float32(scales[j])),
        donate=donate, rescale=rescale, combine=combine, sign_method=sign_method,
    )
