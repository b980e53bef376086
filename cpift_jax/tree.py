"""Pytree helpers: readable leaf paths, strict structure checks and regex rules.

Every other module names parameters by their *leaf path*, the pytree keys joined by "/"
(``"layers/3/mlp/up_proj/kernel"``). Works for nested dicts (``nnx.to_pure_dict``), lists and
``nnx.State`` (whose trailing ``.value`` attribute of a Variable is dropped from the path).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

Pytree = Any
Rules = Sequence[tuple[str, Any]]

__all__ = [
    "path_str",
    "leaf_paths",
    "flatten",
    "map_with_path",
    "check_same_structure",
    "check_same_shapes",
    "resolve_rules",
    "match_rule",
    "num_params",
    "LAYER_PATTERN",
    "layer_index",
]

# The layer number in a leaf path or a Hugging Face tensor name: "layers/3/...", "layers_3/..."
# (Flax linen auto-names), "model.layers.3.mlp...", "transformer.h.3...", "blocks/3/...". The
# container name must be a whole path component ("players/3" is not layer 3).
LAYER_PATTERN = re.compile(r"(?:^|[/.])(?:layers|layer|blocks|h)[/._](\d+)(?:[/.]|$)")


def _key_str(key) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(keypath) -> str:
    """Joins a jax key path into ``"a/b/0/kernel"``; a Variable's trailing ``value`` is dropped."""
    keys = list(keypath)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
        keys = keys[:-1]
    return "/".join(_key_str(k) for k in keys)


def flatten(tree: Pytree) -> tuple[list[str], list[Any], Any]:
    """Returns (paths, leaves, treedef) in ``jax.tree_util`` flatten order."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_str(kp) for kp, _ in with_path]
    leaves = [leaf for _, leaf in with_path]
    return paths, leaves, treedef


def leaf_paths(tree: Pytree) -> list[str]:
    """Leaf paths of ``tree`` in flatten order."""
    return flatten(tree)[0]


def map_with_path(fn: Callable[..., Any], tree: Pytree, *rest: Pytree) -> Pytree:
    """``jax.tree.map`` whose function also receives the leaf path string first."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, *leaves: fn(path_str(kp), *leaves), tree, *rest
    )


def _describe(leaf) -> str:
    shape = getattr(leaf, "shape", None)
    dtype = getattr(leaf, "dtype", None)
    return f"shape {tuple(shape) if shape is not None else '?'} dtype {dtype}"


def check_same_structure(
    a: Pytree,
    b: Pytree,
    *,
    names: tuple[str, str] = ("a", "b"),
    check_dtype: bool = True,
) -> None:
    """Raises ``ValueError`` naming the first leaf path whose presence, shape or dtype differs.

    Leaves are compared in path order, so a message points at a real parameter name
    rather than at a tree-definition dump.
    """
    pa, la, _ = flatten(a)
    pb, lb, _ = flatten(b)
    da, db = dict(zip(pa, la)), dict(zip(pb, lb))
    for path in sorted(set(pa) | set(pb)):
        if path not in da:
            raise ValueError(f"leaf '{path}' is in {names[1]} but missing from {names[0]}")
        if path not in db:
            raise ValueError(f"leaf '{path}' is in {names[0]} but missing from {names[1]}")
        x, y = da[path], db[path]
        if np.shape(x) != np.shape(y):
            raise ValueError(
                f"leaf '{path}': {names[0]} has shape {tuple(np.shape(x))}, "
                f"{names[1]} has shape {tuple(np.shape(y))}"
            )
        if check_dtype and getattr(x, "dtype", None) != getattr(y, "dtype", None):
            raise ValueError(
                f"leaf '{path}': {names[0]} has dtype {getattr(x, 'dtype', None)}, "
                f"{names[1]} has dtype {getattr(y, 'dtype', None)}"
            )
    # Same paths, shapes and dtypes but a different container type (dict vs State) would still
    # break tree.map: say so plainly.
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        raise ValueError(
            f"{names[0]} and {names[1]} hold the same leaf paths in different container types "
            f"({type(a).__name__} vs {type(b).__name__}); convert both, e.g. with nnx.to_pure_dict"
        )


def check_same_shapes(params: Pytree, other: Pytree, *, names=("params", "mask")) -> None:
    """Like ``check_same_structure`` but ignores dtypes (for masks and scalar hyperparameters)."""
    check_same_structure(params, other, names=names, check_dtype=False)


def match_rule(path: str, rules: Rules) -> Any:
    """Value of the first rule whose regex fully matches ``path``; ``KeyError`` if none."""
    for pattern, value in rules:
        if re.fullmatch(pattern, path):
            return value
    raise KeyError(path)


def resolve_rules(tree: Pytree, rules: Rules) -> Pytree:
    """Ordered ``(regex, value)`` rules -> pytree of per-leaf values (first full match wins).

    Every leaf must be covered: a leaf that matches no rule raises ``ValueError`` naming it
    (add a catch-all ``(".*", default)`` last to cover the rest on purpose).
    """
    rules = list(rules)
    for pattern, _ in rules:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"invalid rule regex {pattern!r}: {err}") from None
    paths, _, treedef = flatten(tree)
    values = []
    for path in paths:
        try:
            values.append(match_rule(path, rules))
        except KeyError:
            raise ValueError(
                f"leaf '{path}' matches no rule (patterns: {[p for p, _ in rules]}); "
                "add a catch-all ('.*', value) as the last rule"
            ) from None
    return jax.tree_util.tree_unflatten(treedef, values)


def num_params(tree: Pytree) -> int:
    """Total number of scalar entries."""
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def layer_index(path: str) -> int | None:
    """The layer number in a leaf path or tensor name (``LAYER_PATTERN``), or None for leaves
    outside the layer stack (embeddings, final norm, output head)."""
    match = LAYER_PATTERN.search(path)
    return int(match.group(1)) if match else None
