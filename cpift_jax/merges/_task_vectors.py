"""Plumbing shared by the task-vector operators (not an operator: the name starts with "_").

A *task vector* is ``delta_i = theta_i - theta_base`` (Ilharco et al., 2023). The operators in
this package flatten their inputs once and run one compiled program per leaf
(``_common.leaf_program``, driven by ``run_leaves``) over the float32 task vectors of that leaf,
which they combine in one of two ways:

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
import numpy as np

from cpift_jax import hparams
from cpift_jax import masks as masks_lib
from cpift_jax import tree as tree_lib
from cpift_jax.merges._common import check_models, donatable, f32

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
    first = inputs.unflatten([xs[0] for xs in inputs.models])
    return masks_lib.check_mask(first, mask, names=("models[0]", "mask"))


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


# Leaf-level building blocks, written over *lists* of per-model arrays so that inside one leaf
# program (``_common.leaf_program``) XLA fuses the whole chain into one elementwise loop; no
# (n, *shape) stack is materialised. Weights are float32 arrays (traced: new weights do not
# recompile).


def deltas(model_leaves: Sequence[jax.Array], base_leaf: jax.Array) -> list[jax.Array]:
    """Float32 task vectors ``theta_i - theta_base`` of one leaf."""
    b = f32(base_leaf)
    return [f32(x) - b for x in model_leaves]


def weighted_sum(parts: Sequence[jax.Array], w) -> jax.Array:
    """``sum_i w_i parts_i`` in float32."""
    w = jnp.asarray(w, jnp.float32)
    return functools.reduce(lambda acc, i: acc + w[i] * parts[i], range(1, len(parts)),
                            w[0] * parts[0])


def elect_sign(parts: Sequence[jax.Array], w, method: str = "sum") -> jax.Array:
    """TIES sign election: the sign with the larger total (weighted) mass, or the majority.

    ``"sum"``: ``sign(sum_i w_i delta_i)`` (paper and mergekit default); ``"count"``:
    ``sign(sum_i sign(delta_i))`` over the models with non-zero weight. A tie gives 0, which
    no non-zero entry agrees with, so that entry merges to 0.
    """
    check_choice(method, "sign_method", SIGN_METHODS)
    if method == "sum":
        return jnp.sign(weighted_sum(parts, w))
    voters = jnp.where(jnp.asarray(w, jnp.float32) != 0, 1.0, 0.0)
    return jnp.sign(weighted_sum([jnp.sign(p) for p in parts], voters))


def disjoint_mean(parts: Sequence[jax.Array], w, sign: jax.Array) -> jax.Array:
    """Weighted mean over the models whose (non-zero) entry has the elected sign; 0 if none."""
    w = jnp.asarray(w, jnp.float32)
    agree = [(jnp.sign(p) == sign) & (p != 0) for p in parts]
    num = weighted_sum([jnp.where(a, p, 0.0) for a, p in zip(agree, parts)], w)
    den = weighted_sum([jnp.where(a, 1.0, 0.0) for a in agree], w)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def ties_combine(parts: Sequence[jax.Array], w, sign_method: str = "sum") -> jax.Array:
    return disjoint_mean(parts, w, elect_sign(parts, w, sign_method))


def combine(parts: Sequence[jax.Array], w, method: str, sign_method: str = "sum") -> jax.Array:
    """Merged task vector of one leaf: ``"linear"`` weighted sum or ``"ties"``."""
    check_choice(method, "combine", COMBINE_METHODS)
    if method == "linear":
        return weighted_sum(parts, w)
    return ties_combine(parts, w, sign_method)


def add_to_base(base_leaf: jax.Array, merged_delta: jax.Array, scale) -> jax.Array:
    """``base + scale * delta`` in float32, cast back to the parameters' dtype."""
    return (f32(base_leaf) + scale * merged_delta).astype(base_leaf.dtype)


def float32s(values) -> np.ndarray:
    """Hyperparameters as a float32 array: traced by the leaf programs, so a new value of
    a weight or scale reuses the compiled program."""
    return np.asarray(values, np.float32)


def run_leaves(program, inputs: FlatInputs, args_of, *, donate: bool = False, **static):
    """``program(base_leaf, model_leaves, *args_of(j), **static)`` for every leaf j, donating
    the base leaf where ``donate`` allows (``_common.donatable``); the merged pytree."""
    owns = donatable((inputs.base, inputs.models), donate)
    out = [
        program(b, xs, *args_of(j), donate=owns(b), **static)
        for j, (xs, b) in enumerate(zip(inputs.models, inputs.base))
    ]
    return inputs.unflatten(out)
