"""Core masks: element-wise bool pytrees marking each task's most-updated parameters.

A task's *core region* (CPI-FT, arXiv 2508.21741, Sec. 3.2) is the top ``p`` fraction of
individual scalar parameters by update magnitude ``|theta_task - theta_base|``, ranked once over
the whole model (``scope="global"``; the paper uses p = 1%) or, as an option, within each leaf.
This module builds those masks (``core_mask``), checks them against parameters (``check_mask``),
measures their overlap (``jaccard``, ``overlap_matrix``) and density (``density``,
``density_by``, ``density_by_group``), and stores them bit-packed (``pack``, ``unpack``).

Thresholds come from ``cpift_jax.select.threshold`` (exact k-th largest by counting passes);
it is re-exported here as ``masks.threshold``.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cpift_jax import select_xla
from cpift_jax import tree as tree_lib
from cpift_jax.select import NonFiniteScores, TopK, count_for_fraction, selected, threshold
from cpift_jax.select import top_k as select_top_k

Pytree = Any

__all__ = [
    "SCOPES",
    "threshold",
    "core_mask",
    "core_count",
    "check_mask",
    "jaccard",
    "overlap_matrix",
    "density",
    "density_by",
    "density_by_group",
    "pack",
    "unpack",
]

SCOPES = ("global", "leaf")


# ------------------------------------------------------------------------------------ building


# How many entries a fraction selects (floor, read as a decimal): the rule shared with the
# merge operators' trimming.
core_count = count_for_fraction


def _patterns(arg: str, value) -> list[re.Pattern]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"core_mask: {arg} must be a regex or a list of regexes, got {item!r}")
        try:
            out.append(re.compile(item))
        except re.error as err:
            raise ValueError(f"core_mask: invalid {arg} regex {item!r}: {err}") from None
    return out


def _eligible(paths: list[str], include, exclude) -> list[bool]:
    """Leaves that may hold core entries: some include pattern found, no exclude pattern found."""
    inc, exc = _patterns("include", include), _patterns("exclude", exclude)
    flags = [
        (not inc or any(p.search(path) for p in inc)) and not any(p.search(path) for p in exc)
        for path in paths
    ]
    if not any(flags):
        raise ValueError(
            f"core_mask: include={include!r} / exclude={exclude!r} leave no eligible leaf "
            f"(leaf paths: {paths[:6]}{'...' if len(paths) > 6 else ''})"
        )
    return flags


def _leaf_core(base: jax.Array, tuned: jax.Array, value, last) -> jax.Array:
    """The core mask of one leaf from its ``TopK`` cut, in one read of base and tuned."""
    return selected(jnp.abs(tuned.astype(jnp.float32) - base.astype(jnp.float32)), value, last)


_leaf_core_jit = jax.jit(_leaf_core)


def _leaf_masks(top: TopK, pairs: list[tuple]) -> list[jax.Array]:
    if top.masks is not None:
        return list(top.masks)
    return [_leaf_core_jit(b, t, *top.leaf_cut(j)) for j, (b, t) in enumerate(pairs)]


def _sharded_mesh(paths: list[str], pairs: list[tuple]):
    """The mesh when the leaves are ``jax.Array``s sharded over several devices, else None.

    Then every eligible base and tuned leaf must carry the same ``NamedSharding`` on one mesh.
    """
    def spans(x):
        return (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
                and len(x.sharding.device_set) > 1)

    if not any(spans(x) for pair in pairs for x in pair):
        return None
    mesh = None
    for path, (b, t) in zip(paths, pairs):
        for name, x in (("base", b), ("tuned", t)):
            if (not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer)
                    or not isinstance(x.sharding, NamedSharding)):
                raise ValueError(f"core_mask: leaf '{path}': {name} is not a jax.Array with a "
                                 f"NamedSharding, while other leaves are sharded over a mesh")
        if b.sharding != t.sharding:
            raise ValueError(f"core_mask: leaf '{path}': base has sharding {b.sharding}, tuned "
                             f"has {t.sharding}; expected the same")
        if mesh is None:
            mesh = b.sharding.mesh
        elif b.sharding.mesh != mesh:
            raise ValueError(f"core_mask: leaf '{path}' lives on mesh {b.sharding.mesh}, other "
                             f"leaves on {mesh}; expected one mesh")
    return mesh


@functools.lru_cache(maxsize=64)
def _sharded_program(mesh, specs: tuple, layouts: tuple, k: int, paths: tuple):
    """One compiled ``shard_map`` program: exact top-k masks of ``|tuned - base|``, each shard
    counted where it lives and histograms ``psum``-ed over the axes its leaf is sharded on."""

    def body(bases, tuneds):
        _, chosen, non_finite = select_xla.top_k_masks(list(zip(bases, tuneds)), k,
                                                       list(layouts), paths)
        return chosen, non_finite

    specs = list(specs)
    replicated = [PartitionSpec()] * len(specs)
    # out_shardings: the masks carry the parameters' NamedShardings as given (shard_map alone
    # would report an equivalent, simplified spec, e.g. without size-1 axes).
    out_shardings = tuple([NamedSharding(mesh, s) for s in p] for p in (specs, replicated))
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(specs, specs),
                                 out_specs=(specs, replicated)), out_shardings=out_shardings)


def _sharded_top_k(mesh, paths: list[str], pairs: list[tuple], k: int) -> list[jax.Array]:
    """Core masks of sharded leaves, computed on their devices; masks keep the leaves' shardings."""
    if k == 0:
        return [jnp.zeros(b.shape, bool, device=b.sharding) for b, _ in pairs]
    specs = tuple(b.sharding.spec for b, _ in pairs)
    layouts = tuple(select_xla.LeafLayout.from_spec(b.shape, spec)
                    for (b, _), spec in zip(pairs, specs))
    program = _sharded_program(mesh, specs, layouts, k, tuple(paths))
    chosen, non_finite = program([b for b, _ in pairs], [t for _, t in pairs])
    for path, bad in zip(paths, non_finite):
        if bool(bad):
            raise ValueError(f"core_mask: leaf '{path}': |tuned - base| has NaN or Inf entries")
    return list(chosen)


def _top_k(paths: list[str], pairs: list[tuple], k: int, mesh=None) -> list[jax.Array]:
    if mesh is not None:
        return _sharded_top_k(mesh, paths, pairs, k)
    try:
        top = select_top_k(pairs, k, finite=True)
    except NonFiniteScores as err:
        raise ValueError(
            f"core_mask: leaf '{paths[err.leaf]}': |tuned - base| has NaN or Inf entries"
        ) from None
    return _leaf_masks(top, pairs)


def core_mask(
    base: Pytree,
    tuned: Pytree,
    fraction: float,
    scope: str = "global",
    *,
    include=None,
    exclude=None,
) -> Pytree:
    """True on the ``floor(fraction * D)`` entries with the largest ``|tuned - base|``.

    ``scope="global"`` ranks all D eligible scalars together (the paper's rule);
    ``scope="leaf"`` ranks within each eligible leaf (D = the leaf's size). Deltas are taken in
    float32 whatever the parameter dtype.

    Tie rule: exactly ``floor(fraction * D)`` entries are selected (0 gives an all-False mask,
    no error). Entries strictly above the threshold are all in; among entries equal to it the
    earliest in flatten order (jax.tree_util leaf order, then row-major index) are taken.

    Args:
      base, tuned: pytrees (dict, nnx.State, ...) of float arrays with identical structure,
        shapes and dtypes.
      fraction: in (0, 1], read as the decimal it prints as (``core_count``).
      scope: "global" or "leaf".
      include, exclude: a regex or list of regexes over leaf paths (``re.search``, so
        ``"embed"`` matches ``"model/embed_tokens/embedding"``). A leaf is eligible when some
        include pattern matches (all leaves if ``include`` is None) and no exclude pattern
        does; ineligible leaves get all-False masks and do not count in D.

    Sharded models: when the leaves are ``jax.Array``s spanning several devices (each with a
    ``NamedSharding`` on one mesh, base and tuned alike), the masks are computed where the
    shards live (``select_xla.top_k_masks`` under ``shard_map``: exact counts at any size, no
    host gather) and come back with the parameters' shardings; same masks as one device.

    Returns:
      A bool pytree with the structure of ``base``.

    Raises:
      ValueError: fraction outside (0, 1]; unknown scope; base/tuned mismatch (names the leaf);
        non-float leaves; include/exclude leaving no eligible leaf; NaN or Inf in a delta
        (names the leaf). The NaN/Inf check reads the values, so under ``jit`` it is skipped:
        there a NaN delta makes the threshold NaN and the affected masks all-False, and an
        Inf delta ranks as the largest.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)):
        raise ValueError(f"core_mask: fraction must be a number in (0, 1], got {fraction!r}")
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"core_mask: fraction must be in (0, 1], got {fraction!r}")
    if scope not in SCOPES:
        raise ValueError(f"core_mask: scope must be one of {SCOPES}, got {scope!r}")
    tree_lib.check_same_structure(base, tuned, names=("base", "tuned"))
    paths, base_leaves, treedef = tree_lib.flatten(base)
    tuned_leaves = tree_lib.flatten(tuned)[1]
    for path, leaf in zip(paths, base_leaves):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise ValueError(f"core_mask: leaf '{path}' has dtype {leaf.dtype}, expected float")
    eligible = _eligible(paths, include, exclude)
    index = [i for i, ok in enumerate(eligible) if ok]
    pairs = [(base_leaves[i], tuned_leaves[i]) for i in index]
    names = [paths[i] for i in index]
    mesh = _sharded_mesh(names, pairs)
    if scope == "global":
        total = sum(int(np.size(b)) for b, _ in pairs)
        chosen = _top_k(names, pairs, core_count(fraction, total), mesh)
    else:
        chosen = [_top_k([name], [pair], core_count(fraction, int(np.size(pair[0]))), mesh)[0]
                  for name, pair in zip(names, pairs)]

    def no_core(leaf):  # sharded like its parameter where it has a sharding
        sharding = getattr(leaf, "sharding", None) if mesh is not None else None
        return jnp.zeros(np.shape(leaf), bool, device=sharding)

    out = [no_core(leaf) for leaf in base_leaves]
    for i, mask in zip(index, chosen):
        out[i] = mask
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------- inspecting


def _whole_leaf(leaf) -> bool:
    return leaf is None or isinstance(leaf, (bool, np.bool_))


def check_mask(params: Pytree | None, mask: Pytree, *, names: tuple[str, str] = ("params", "mask"),
               whole_leaves: bool = False) -> list:
    """The leaves of ``mask`` in ``params``' flatten order, checked; the one mask validator.

    Leaves are matched by leaf path (so a dict mask fits an ``nnx.State``); ``mask`` must hold
    exactly ``params``' paths, and each leaf must have its parameter's shape and dtype bool.
    ``whole_leaves=True`` also takes None or a Python bool for a whole leaf (returned as is).
    ``params=None`` checks the dtypes alone. ValueError naming the first offending leaf path.
    """
    with_path, _ = jax.tree_util.tree_flatten_with_path(mask, is_leaf=_whole_leaf if whole_leaves else None)
    by_path = {tree_lib.path_str(kp): leaf for kp, leaf in with_path}
    if params is None:
        paths, shapes = list(by_path), [None] * len(by_path)
    else:
        paths, p_leaves, _ = tree_lib.flatten(params)
        shapes = [tuple(np.shape(x)) for x in p_leaves]
        for path in sorted(set(paths) ^ set(by_path)):
            where = names[::-1] if path in by_path else names
            raise ValueError(f"leaf '{path}' is in {where[0]} but missing from {where[1]}")
    out = []
    for path, shape in zip(paths, shapes):
        leaf = by_path[path]
        if not (whole_leaves and _whole_leaf(leaf)):
            if shape is not None and tuple(np.shape(leaf)) != shape:
                raise ValueError(f"leaf '{path}': {names[0]} has shape {shape}, "
                                 f"{names[1]} has shape {tuple(np.shape(leaf))}")
            dtype = getattr(leaf, "dtype", None)
            if dtype != np.bool_:
                hint = " (a bit-packed mask? unpack it first)" if dtype == np.uint8 else ""
                raise ValueError(f"leaf '{path}': {names[1]} has dtype {dtype}, expected bool{hint}")
        out.append(leaf)
    return out


def _bool_leaves(mask: Pytree, name: str) -> tuple[list[str], list[np.ndarray]]:
    """Leaf paths and flattened NumPy arrays of a bool pytree (dtypes checked by ``check_mask``)."""
    leaves = check_mask(None, mask, names=(name, name))
    return tree_lib.leaf_paths(mask), [np.asarray(leaf).reshape(-1) for leaf in leaves]


def jaccard(mask_a: Pytree, mask_b: Pytree) -> float:
    """``|A & B| / |A | B|`` over all leaves; 1.0 when both masks are empty (identical sets)."""
    tree_lib.check_same_shapes(mask_a, mask_b, names=("mask_a", "mask_b"))
    _, a = _bool_leaves(mask_a, "mask_a")
    _, b = _bool_leaves(mask_b, "mask_b")
    inter = sum(np.count_nonzero(x & y) for x, y in zip(a, b))
    union = sum(np.count_nonzero(x | y) for x, y in zip(a, b))
    return 1.0 if union == 0 else inter / union


def _packed_words(flat: np.ndarray) -> np.ndarray:
    """Bool vector -> uint64 words (8 entries per byte, zero-padded)."""
    packed = np.packbits(flat)
    packed = np.concatenate([packed, np.zeros(-packed.size % 8, np.uint8)])
    return packed.view(np.uint64)


def overlap_matrix(masks: Sequence[Pytree]) -> np.ndarray:
    """Pairwise Jaccard matrix (N, N) float64; symmetric, diagonal 1.

    Intersections are popcounts of AND-ed bit-packed words, leaf by leaf, so memory stays at
    N bit-packed copies of one leaf (D/8 bytes per mask for a 1e8-entry leaf: 12.5 MB).
    """
    masks = list(masks)
    if not masks:
        raise ValueError("overlap_matrix: need at least one mask")
    for i, m in enumerate(masks[1:], start=1):
        tree_lib.check_same_shapes(masks[0], m, names=("masks[0]", f"masks[{i}]"))
    per_mask = [_bool_leaves(m, f"masks[{i}]")[1] for i, m in enumerate(masks)]
    n = len(masks)
    inter = np.zeros((n, n), np.int64)
    for leaf in range(len(per_mask[0])):
        words = [_packed_words(leaves[leaf]) for leaves in per_mask]
        for i in range(n):
            for j in range(i, n):
                inter[i, j] += int(np.bitwise_count(words[i] & words[j]).sum())
    sizes = np.diag(inter).copy()
    inter = np.triu(inter) + np.triu(inter, 1).T
    union = sizes[:, None] + sizes[None, :] - inter
    out = np.ones((n, n), np.float64)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def density(mask: Pytree) -> dict:
    """``{"per_leaf": {path: fraction True}, "total": fraction True, "count": int}``.

    Empty leaves (size 0) have density 0.0.
    """
    paths, arrays = _bool_leaves(mask, "mask")
    counts = [int(np.count_nonzero(a)) for a in arrays]
    sizes = [a.size for a in arrays]
    total = sum(sizes)
    return {
        "per_leaf": {p: c / s if s else 0.0 for p, c, s in zip(paths, counts, sizes)},
        "total": sum(counts) / total if total else 0.0,
        "count": sum(counts),
    }


def density_by_group(mask: Pytree, key_fn: Callable[[str], Hashable]) -> dict:
    """Density per group of leaves: ``{key_fn(path): {"count", "size", "density"}}``.

    Every leaf lands in the group ``key_fn`` returns for its path (None is a group like any
    other). Groups appear in order of first leaf. E.g. ``density_by_group(m,
    tree.layer_index)`` for per-layer densities.
    """
    paths, arrays = _bool_leaves(mask, "mask")
    groups: dict = {}
    for path, a in zip(paths, arrays):
        g = groups.setdefault(key_fn(path), {"count": 0, "size": 0})
        g["count"] += int(np.count_nonzero(a))
        g["size"] += a.size
    for g in groups.values():
        g["density"] = g["count"] / g["size"] if g["size"] else 0.0
    return groups


def density_by(mask: Pytree, rules: Sequence[tuple[str, Hashable]]) -> dict:
    """``density_by_group`` with groups from ordered ``(regex, group)`` rules.

    First ``re.fullmatch`` wins and every leaf must match a rule (``tree.resolve_rules``), e.g.
    ``[(r".*attn.*", "attention"), (r".*mlp.*", "mlp"), (r".*", "other")]``.
    """
    rules = list(rules)
    tree_lib.resolve_rules(mask, rules)  # checks the regexes and that every leaf is covered
    return density_by_group(mask, lambda path: tree_lib.match_rule(path, rules))


# ------------------------------------------------------------------------------------- storage


def pack(mask: Pytree) -> Pytree:
    """Bool pytree -> pytree of uint8 NumPy arrays, 8 entries per byte (``np.packbits`` order).

    Each leaf is flattened row-major and packed to ``ceil(size / 8)`` bytes; the shapes are not
    stored (``unpack`` takes them from ``like``).
    """
    paths, arrays = _bool_leaves(mask, "mask")
    treedef = jax.tree_util.tree_structure(mask)
    return jax.tree_util.tree_unflatten(treedef, [np.packbits(a) for a in arrays])


def unpack(packed: Pytree, like: Pytree) -> Pytree:
    """Inverse of ``pack``: bool NumPy arrays with the structure and shapes of ``like``.

    ``like`` holds arrays or ``jax.ShapeDtypeStruct``s. Leaves are matched by path, so a packed
    tree restored as a plain dict unpacks against an ``nnx.State``. ValueError names the first
    leaf that is missing, extra, not uint8, or of the wrong byte length for its shape.
    """
    p_paths, p_leaves, _ = tree_lib.flatten(packed)
    l_paths, l_leaves, treedef = tree_lib.flatten(like)
    by_path = dict(zip(p_paths, p_leaves))
    for path in sorted(set(p_paths) ^ set(l_paths)):
        where = "packed" if path in by_path else "like"
        raise ValueError(f"unpack: leaf '{path}' is only in {where}")
    out = []
    for path, ref in zip(l_paths, l_leaves):
        shape = tuple(np.shape(ref))
        size = math.prod(shape)
        data = np.asarray(by_path[path])
        if data.dtype != np.uint8 or data.ndim != 1 or data.size != -(-size // 8):
            raise ValueError(
                f"unpack: leaf '{path}': expected {-(-size // 8)} packed uint8 bytes for shape "
                f"{shape}, got {data.dtype} array of shape {data.shape}"
            )
        out.append(np.unpackbits(data, count=size).astype(bool).reshape(shape))
    return jax.tree_util.tree_unflatten(treedef, out)
