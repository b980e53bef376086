"""Plumbing shared by the task-vector operators (not an operator: the name starts with "_").

A *task vector* is ``delta_i = theta_i - theta_base`` (Ilharco et al., 2023). The operators in
this package flatten their inputs once, work leaf by leaf on float32 stacks of shape
``(n_models, *leaf_shape)``, and combine task vectors in one of two ways:

- ``"linear"``: ``sum_i w_i delta_i`` (task arithmetic);
- ``"ties"``: TIES sign election and disjoint mean (Yadav et al., 2023), see ``ties_combine``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from cpift_jax import hparams
from cpift_jax import tree as tree_lib
from cpift_jax.merges._common import check_models, f32

Pytree = Any

COMBINE_METHODS = ("linear", "ties")
SIGN_METHODS = ("sum", "count")


@dataclasses.dataclass(frozen=True)
class FlatInputs:
    """The models (and base) flattened once: ``models[j]`` holds leaf j of every model."""

    paths: list[str]
    models: list[tuple[jax.Array, ...]]
    base: list[jax.Array | None]
    treedef: Any

    def unflatten(self, leaves: Sequence[jax.Array]) -> Pytree:
        return jax.tree_util.tree_unflatten(self.treedef, list(leaves))

    def per_leaf(self, value, name: str) -> list:
        """A scalar or per-leaf pytree hyperparameter as one value per leaf."""
        return hparams.values_for_paths(value, self.paths, name=name)


def flat_inputs(
    models: Sequence[Pytree],
    base: Pytree | None,
    *,
    operator: str,
    require_base: bool = False,
    min_models: int = 1,
) -> FlatInputs:
    """Validates and flattens the inputs; ``require_base`` raises a clear error without one."""
    if require_base and base is None:
        raise ValueError(
            f"{operator} needs base= (the model the task vectors are measured from, usually "
            "the pre-trained checkpoint)"
        )
    check_models(models, base, min_models=min_models)
    paths, _, treedef = tree_lib.flatten(models[0])
    per_model = [jax.tree_util.tree_leaves(m) for m in models]
    base_leaves = jax.tree_util.tree_leaves(base) if base is not None else [None] * len(paths)
    return FlatInputs(paths, list(zip(*per_model)), base_leaves, treedef)


def mask_leaves(mask: Pytree | None, inputs: FlatInputs) -> list:
    """Per-leaf bool masks (``None`` leaves if no mask), checked against the models' shapes."""
    if mask is None:
        return [None] * len(inputs.paths)
    paths, leaves, _ = tree_lib.flatten(mask)
    differ = sorted(set(inputs.paths) ^ set(paths))
    if differ:
        raise ValueError(f"mask must have the models' leaves; leaf '{differ[0]}' differs")
    by_path = dict(zip(paths, leaves))
    leaves = [by_path[p] for p in inputs.paths]
    for path, leaf, model_leaf in zip(inputs.paths, leaves, (xs[0] for xs in inputs.models)):
        if jnp.result_type(leaf) != jnp.bool_ or jnp.shape(leaf) != model_leaf.shape:
            raise ValueError(
                f"mask leaf '{path}' must be bool of shape {tuple(model_leaf.shape)}, got "
                f"{jnp.result_type(leaf)} of shape {tuple(jnp.shape(leaf))}"
            )
    return leaves


def check_choice(value, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_per_leaf(
    values: Sequence, paths: Sequence[str], name: str, ok: Callable[[float], bool], expected: str
) -> list[float]:
    """Converts per-leaf hyperparameters to float, raising with the leaf path if not ``ok``."""
    out = []
    for path, value in zip(paths, values):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} for leaf '{path}' must be a number, got {value!r}") from None
        if not ok(number):
            raise ValueError(f"{name} for leaf '{path}' must be {expected}, got {number}")
        out.append(number)
    return out


def task_weights(weights, n: int, *, nonnegative: bool) -> list[float]:
    """Per-model weights for task vectors; ``None`` means 1 each (a plain sum, as in the papers)."""
    if weights is None:
        return [1.0] * n
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise ValueError(f"weights must be a list of {n} numbers, got {weights!r}")
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries for {n} models")
    if nonnegative and any(x < 0 for x in w):
        raise ValueError(f"weights must be >= 0 for this operator, got {w}")
    return w


# The leaf kernels below are jitted: eager callers then compile one fused kernel per leaf shape
# instead of a dozen single-op ones, and big leaves are read once. Weights are traced arrays, so
# new weights do not recompile.


@jax.jit
def deltas(model_leaves: Sequence[jax.Array], base_leaf: jax.Array) -> jax.Array:
    """Float32 stack ``(n, *shape)`` of ``theta_i - theta_base`` for one leaf."""
    b = f32(base_leaf)
    return jnp.stack([f32(x) - b for x in model_leaves])


def column(w, ndim: int) -> jax.Array:
    """Per-model weights shaped ``(n, 1, ..., 1)`` to broadcast against an ``ndim`` stack."""
    w = jnp.asarray(w, jnp.float32)
    return w.reshape((w.shape[0],) + (1,) * (ndim - 1))


@jax.jit
def weighted_sum(stack: jax.Array, w) -> jax.Array:
    return jnp.sum(column(w, stack.ndim) * stack, axis=0)


@functools.partial(jax.jit, static_argnames="method")
def elect_sign(stack: jax.Array, w, method: str = "sum") -> jax.Array:
    """TIES sign election: the sign with the larger total (weighted) mass, or the majority.

    ``"sum"``: ``sign(sum_i w_i delta_i)`` (paper and mergekit default); ``"count"``:
    ``sign(sum_i sign(delta_i))`` over the models with non-zero weight. A tie gives 0, which
    no non-zero entry agrees with, so that entry merges to 0.
    """
    check_choice(method, "sign_method", SIGN_METHODS)
    if method == "sum":
        return jnp.sign(weighted_sum(stack, w))
    voters = jnp.where(jnp.asarray(w, jnp.float32) != 0, 1.0, 0.0)
    return jnp.sign(weighted_sum(jnp.sign(stack), voters))


@jax.jit
def disjoint_mean(stack: jax.Array, w, sign: jax.Array) -> jax.Array:
    """Weighted mean over the models whose (non-zero) entry has the elected sign; 0 if none."""
    agree = (jnp.sign(stack) == sign[None]) & (stack != 0)
    wc = column(w, stack.ndim)
    num = jnp.sum(jnp.where(agree, wc * stack, 0.0), axis=0)
    den = jnp.sum(jnp.where(agree, wc, 0.0), axis=0)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames="sign_method")
def ties_combine(stack: jax.Array, w, sign_method: str = "sum") -> jax.Array:
    return disjoint_mean(stack, w, elect_sign(stack, w, sign_method))


def combine(stack: jax.Array, w, method: str, sign_method: str = "sum") -> jax.Array:
    """Merged task vector of one leaf: ``"linear"`` weighted sum or ``"ties"``."""
    check_choice(method, "combine", COMBINE_METHODS)
    if method == "linear":
        return weighted_sum(stack, w)
    return ties_combine(stack, w, sign_method)


@jax.jit
def add_to_base(base_leaf: jax.Array, merged_delta: jax.Array, scale: float) -> jax.Array:
    """``base + scale * delta`` in float32, cast back to the parameters' dtype."""
    return (f32(base_leaf) + scale * merged_delta).astype(base_leaf.dtype)
