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
index and then the leaf index, so every leaf of every task draws its own mask and a result is
reproducible from the seed alone. Defaults: ``drop_rate=0.9`` (the paper shows SFT deltas
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

from cpift_jax.merges import _task_vectors as tv

REQUIRES_BASE = True
STOCHASTIC = True
EXAMPLE_HPARAMS = {"drop_rate": 0.5, "seed": 3}
PER_LEAF_HPARAMS = ("drop_rate", "scale")
INTERPOLATION_ENDPOINTS = (
    ({"weights": (1.0, 0.0), "drop_rate": 0.0}, 0),
    ({"weights": (0.0, 1.0), "drop_rate": 0.0}, 1),
    ({"weights": (1.0, 0.0), "drop_rate": 0.0, "combine": "ties"}, 0),
)
RESCALES = ("inverse", "norm", "none")


@functools.partial(jax.jit, static_argnames=("drop_rate", "rescale"))
def drop_and_rescale(delta: jax.Array, key: jax.Array, drop_rate: float, rescale: str):
    """One task vector leaf with entries dropped with probability ``drop_rate``, rescaled."""
    keep = jax.random.bernoulli(key, 1.0 - drop_rate, delta.shape)
    dropped = jnp.where(keep, delta, 0.0)
    if rescale == "inverse":
        return dropped * (1.0 / (1.0 - drop_rate) if drop_rate < 1.0 else 0.0)
    if rescale == "norm":
        before, after = jnp.linalg.norm(delta), jnp.linalg.norm(dropped)
        return dropped * jnp.where(after > 0, before / jnp.where(after > 0, after, 1.0), 0.0)
    return dropped


def dropped_task_vectors(inputs: tv.FlatInputs, drop_rates, rescale: str, seed: int):
    """Per-leaf ``(n, *shape)`` stacks of dropped-and-rescaled task vectors."""
    key = jax.random.key(int(seed))
    out = []
    for leaf, (xs, b, p) in enumerate(zip(inputs.models, inputs.base, drop_rates)):
        stack = tv.deltas(xs, b)
        out.append(
            jnp.stack([
                drop_and_rescale(
                    stack[i], jax.random.fold_in(jax.random.fold_in(key, i), leaf), p, rescale
                )
                for i in range(len(xs))
            ])
        )
    return out


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
):
    inputs = tv.flat_inputs(models, base, operator="dare", require_base=True)
    tv.check_choice(rescale, "rescale", RESCALES)
    tv.check_choice(combine, "combine", tv.COMBINE_METHODS)
    tv.check_choice(sign_method, "sign_method", tv.SIGN_METHODS)
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be a Python int, got {seed!r}")
    w = tv.task_weights(weights, len(models), nonnegative=combine == "ties")
    drop_rates = tv.check_per_leaf(
        inputs.per_leaf(drop_rate, "drop_rate"), inputs.paths, "drop_rate",
        lambda p: 0.0 <= p <= 1.0, "in [0, 1]",
    )
    scales = tv.check_per_leaf(
        inputs.per_leaf(scale, "scale"), inputs.paths, "scale", math.isfinite, "finite"
    )
    stacks = dropped_task_vectors(inputs, drop_rates, rescale, seed)
    out = [
        tv.add_to_base(b, tv.combine(st, w, combine, sign_method), s)
        for st, b, s in zip(stacks, inputs.base, scales)
    ]
    return inputs.unflatten(out)
