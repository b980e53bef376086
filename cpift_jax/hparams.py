"""Per-parameter hyperparameters: regex rules and layer gradients -> a pytree of scalars.

Merge operators take every hyperparameter (``density``, ``scale``, ``t``, ...) either as one
scalar or as a pytree of scalars with the models' structure. This module builds such pytrees
*outside* the operators, so an operator never parses rules itself:

    rules = [
        (r".*/attn/.*", 0.3),             # a constant
        (r".*/mlp/.*", [0.1, 0.5, 0.9]),  # a layer gradient: 0.1 at layer 0 ... 0.9 at the last
        (r".*", 0.5),                     # the required catch-all
    ]
    density = hparams.resolve(params, rules)   # same structure as params, float leaves
    merged = merges.get("ties")(models, base=base, density=density)

Rules are ordered ``(regex, value)`` pairs; the first regex that fully matches the leaf path
wins (``cpift_jax.tree.resolve_rules``), and the last rule must be a catch-all so that every
default is written down.

**Layer gradients** (as in mergekit's list-valued parameters): a list of anchors
``[v_0, ..., v_m]`` is spread evenly over the layers. A leaf of layer ``L`` (read from its path
by ``cpift_jax.tree.layer_index``: ``layers/L/``, ``layers_L/``, ``model.layers.L.``, ...) out of
``N`` layers sits at position
``x = L / (N - 1)`` (``x = 0`` when ``N = 1``) and takes the piecewise-linear interpolation of
the anchors at ``x * m``. ``N`` is one more than the largest layer index in the tree unless
``num_layers`` is given. Leaves outside the layer stack (embeddings, final norm) take the first
anchor (``unlayered="first"``), the last (``"last"``), or raise (``"error"``); put an explicit
rule before the gradient to give them their own value.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from cpift_jax import tree as tree_lib

Pytree = Any

__all__ = [
    "resolve",
    "interpolate_anchors",
    "per_leaf",
    "values_for_paths",
    "is_per_leaf",
]

# Paths no real parameter has: a catch-all must match these as well as every leaf path.
_CATCH_ALL_PROBES = ("x", "zz_probe/999/not_a_param", "a.b/c-d/0")


def interpolate_anchors(anchors: Sequence[float], position: float) -> float:
    """Piecewise-linear value of evenly spaced ``anchors`` at ``position`` in [0, 1]."""
    values = [float(v) for v in anchors]
    if len(values) == 1:
        return values[0]
    return float(np.interp(position * (len(values) - 1), np.arange(len(values)), values))


def _is_gradient(value) -> bool:
    return isinstance(value, (list, tuple))


def _check_rules(rules, paths: list[str]) -> list[tuple[str, Any]]:
    rules = list(rules)
    if not rules:
        raise ValueError("no rules given; pass at least a catch-all ('.*', value)")
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"rule {i} must be a (regex, value) pair, got {rule!r}")
        pattern, value = rule
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"rule {i}: invalid regex {pattern!r}: {err}") from None
        if _is_gradient(value):
            if not value or not all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value
            ):
                raise ValueError(
                    f"rule {i} ({pattern!r}): a layer gradient must be a non-empty list of "
                    f"numbers, got {value!r}"
                )
    last = rules[-1][0]
    if not all(re.fullmatch(last, p) for p in (*paths, *_CATCH_ALL_PROBES)):
        raise ValueError(
            f"the last rule must be a catch-all such as ('.*', default), got pattern {last!r}"
        )
    return rules


def resolve(
    tree: Pytree,
    rules: Sequence[tuple[str, Any]],
    *,
    num_layers: int | None = None,
    unlayered: str = "first",
) -> Pytree:
    """Per-leaf hyperparameter values for ``tree`` from ordered ``(regex, value)`` rules.

    ``value`` is a scalar (used as is) or a list of anchors (a layer gradient, see the module
    docstring). Returns a pytree with ``tree``'s structure whose leaves are Python floats (or
    the scalars given). Raises ``ValueError`` for a missing catch-all, an invalid regex, a
    malformed gradient, or (``unlayered="error"``) a gradient reaching a leaf with no layer.
    """
    if unlayered not in ("first", "last", "error"):
        raise ValueError(f"unlayered must be 'first', 'last' or 'error', got {unlayered!r}")
    paths, _, treedef = tree_lib.flatten(tree)
    rules = _check_rules(rules, paths)
    # Index of the winning rule per leaf (first full match; the catch-all guarantees one).
    indexed = [(pattern, i) for i, (pattern, _) in enumerate(rules)]
    matched = [tree_lib.match_rule(path, indexed) for path in paths]
    layers = [tree_lib.layer_index(p) for p in paths]
    if num_layers is None:
        known = [layer for layer in layers if layer is not None]
        num_layers = max(known) + 1 if known else 1
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")

    values = []
    for path, rule_idx, layer in zip(paths, matched, layers):
        pattern, value = rules[rule_idx]
        if not _is_gradient(value):
            values.append(value)
            continue
        if layer is None:
            if unlayered == "error":
                raise ValueError(
                    f"leaf '{path}' has no layer index (tree.LAYER_PATTERN) but rule "
                    f"{pattern!r} gives a layer gradient; add a rule for it before this one"
                )
            values.append(float(value[0] if unlayered == "first" else value[-1]))
            continue
        if layer >= num_layers:
            raise ValueError(f"leaf '{path}' is in layer {layer} but num_layers={num_layers}")
        position = layer / (num_layers - 1) if num_layers > 1 else 0.0
        values.append(interpolate_anchors(value, position))
    return jax.tree_util.tree_unflatten(treedef, values)


def is_per_leaf(value) -> bool:
    """True if ``value`` is a pytree of values rather than one scalar (or string)."""
    if value is None or isinstance(value, (str, numbers.Number, np.generic)):
        return False
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return False
    return not jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(value))


def per_leaf(value, tree: Pytree, *, name: str) -> list:
    """One value per leaf of ``tree`` (flatten order) from a scalar or a matching pytree.

    A scalar is broadcast. A pytree must hold exactly ``tree``'s leaf paths (its container
    types may differ, e.g. a dict for an ``nnx.State``) with a scalar at each leaf; otherwise
    ``ValueError`` names the hyperparameter and the first offending leaf path.
    """
    return values_for_paths(value, tree_lib.leaf_paths(tree), name=name)


def values_for_paths(value, paths: Sequence[str], *, name: str) -> list:
    """``per_leaf`` given the leaf paths instead of the tree."""
    if not is_per_leaf(value):
        if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar or a pytree of scalars, got an array")
        return [value] * len(paths)
    value_paths, leaves, _ = tree_lib.flatten(value)
    by_path = dict(zip(value_paths, leaves))
    for path in paths:
        if path not in by_path:
            raise ValueError(
                f"{name}: no value for leaf '{path}' (the pytree must match the models)"
            )
    known = set(paths)
    for path in value_paths:
        if path not in known:
            raise ValueError(f"{name}: leaf '{path}' is not a parameter of the models")
    for path, leaf in by_path.items():
        if np.ndim(leaf) != 0:
            raise ValueError(
                f"{name}: leaf '{path}' must be a scalar, got shape {tuple(np.shape(leaf))}"
            )
    return [by_path[p] for p in paths]
