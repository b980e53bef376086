"""A device mesh from the config, and sharding rules from leaf paths to ``NamedSharding``s.

**Mesh.** ``config.mesh`` (``default_mesh_config()``) names the mesh axes and their sizes::

    mesh.axes  = ("data", "fsdp", "tensor")
    mesh.shape = (-1, 1, 1)        # one -1 takes the devices the other axes leave
    mesh.max_unsharded_fraction = 0.05

``make_mesh(config.mesh)`` builds a ``jax.sharding.Mesh`` over the visible devices (one device:
a 1x1x1 mesh, i.e. today's single-device behaviour); ``abstract_mesh(config.mesh, n)`` plans a
layout for ``n`` devices that this machine does not have.

**Rules.** A parameter's sharding is chosen in two steps. Ordered ``(regex, logical axes)``
rules give each leaf path one logical axis per dimension (the first regex that fully matches
wins, ``tree.match_rule``); a logical-axis table maps each logical axis to mesh axes. The
Llama family (Llama, Mistral, Qwen2 and Gemma-style layouts; kernels are ``[in, out]``):

==========================================  ====================  ==========================
leaf path (any prefix, e.g. ``0/mu/``)       logical axes          mesh axes (default)
==========================================  ====================  ==========================
``.../embed_tokens/embedding``               (vocab, embed)        (tensor, fsdp)
``lm_head/kernel``                           (embed, vocab)        (fsdp, tensor)
``.../self_attn/{q,k,v}_proj/kernel``        (embed, heads)        (fsdp, tensor)
``.../self_attn/{q,k,v}_proj/bias`` (Qwen2)  (heads,)              (tensor,)
``.../self_attn/o_proj/kernel``              (heads, embed)        (tensor, fsdp)
``.../mlp/{gate,up}_proj/kernel``            (embed, mlp)          (fsdp, tensor)
``.../mlp/{gate,up}_proj/bias``              (mlp,)                (tensor,)
``.../mlp/down_proj/kernel``                 (mlp, embed)          (tensor, fsdp)
``.../{o,down}_proj/bias``, ``...norm*/..``  (norm,)               replicated
stacked layer leaf ``.../layers/<leaf>``     (layers, <leaf's>)    (replicated, <leaf's>)
==========================================  ====================  ==========================

A *stacked* layer leaf (``models.scan.stack_layers``: under ``layers/`` without an integer
index, one rank more than its rule names) gets the ``layers`` logical axis in front, its
``[num_layers]`` axis, replicated by default; the divisibility fallback never moves a mesh axis
onto it, so each layer's slice is sharded as the unstacked layer is. Any other rank mismatch
is an error.

Every leaf of rank >= 1 must match a rule (the coverage check names the leaf that does not);
a scalar (an optimizer step count) has nothing to partition and is replicated without one.
Because the rules match a path's tail, the same rules shard gradients, AdamW moments
(``0/mu/model/...``), freeze masks and core masks (bool leaves get their parameter's
partition): ``tree_shardings`` is the one sharding function for all of them.

**Divisibility.** JAX refuses a partition that does not divide a dimension, and padding is no
option (padded entries would enter the core ranking), so a mesh axis that does not divide its
dimension moves to the first other dimension of the leaf that it divides (together with the
axes that dimension already has), else the leaf is replicated along it; either way the leaf
path, its shape and the mesh axis are logged at WARNING. A leaf whose rule asked for more than
one device but which ends up on every device whole counts as *unsharded*; ``shardings`` raises
if those hold more than ``mesh.max_unsharded_fraction`` of all entries. Leaves replicated by
design (norms, or everything on a pure data-parallel mesh) do not count.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from cpift_jax import tree as tree_lib

Pytree = Any
MeshLike = Mesh | AbstractMesh
MeshAxes = str | tuple[str, ...] | None

__all__ = [
    "default_mesh_config",
    "resolve_mesh_shape",
    "make_mesh",
    "abstract_mesh",
    "ShardingRules",
    "LLAMA_LEAF_RULES",
    "LLAMA_LOGICAL_AXES",
    "LLAMA_RULES",
    "STACKED_LAYERS_AXIS",
    "partition_specs",
    "tree_shardings",
    "shardings",
    "replicated_fraction",
    "shard",
]

logger = logging.getLogger(__name__)

# Auto axes, deliberately: the compiler propagates shardings between the in/out shardings we
# give `jit`, which is what the existing operators (written without sharding-in-types) expect.
# Explicit axes (jax.make_mesh's default) would make every traced op carry a sharding type and
# reject code that mixes differently sharded operands without an explicit reshard.
_AXIS_TYPE = AxisType.Auto


# ------------------------------------------------------------------------------------- mesh


def default_mesh_config() -> ml_collections.ConfigDict:
    """``config.mesh``: data, fsdp and tensor axes, all devices on ``data`` (data parallel)."""
    config = ml_collections.ConfigDict()
    config.axes = ("data", "fsdp", "tensor")
    config.shape = (-1, 1, 1)  # one -1 takes the remaining devices
    # Fail when more than this fraction of all entries stays whole on every device because no
    # dimension of its leaf divides the mesh axes its rule asks for.
    config.max_unsharded_fraction = 0.05
    return config


def resolve_mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """``mesh.shape`` with its -1 resolved so that the product is ``num_devices``.

    Raises ``ValueError`` naming ``mesh.axes`` / ``mesh.shape`` and the device count when the
    axes are not distinct names, the lengths differ, a size is not a positive int (or the one
    -1), or the sizes do not multiply to ``num_devices``.
    """
    axes, shape = tuple(mesh_config.axes), tuple(mesh_config.shape)
    if not axes or not all(isinstance(a, str) and a for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"mesh.axes must be distinct non-empty names, got {axes!r}")
    if len(shape) != len(axes):
        raise ValueError(
            f"mesh.shape {shape!r} has {len(shape)} sizes but mesh.axes {axes!r} has {len(axes)}"
        )
    for size in shape:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (
            size < 1 and size != -1
        ):
            raise ValueError(f"mesh.shape {shape!r}: sizes must be positive ints or one -1")
    if list(shape).count(-1) > 1:
        raise ValueError(f"mesh.shape {shape!r}: at most one size may be -1")
    fixed = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % fixed:
            raise ValueError(
                f"mesh.shape {shape!r}: the fixed sizes multiply to {fixed}, which does not "
                f"divide the {num_devices} devices, so -1 has no integer value"
            )
        shape = tuple(num_devices // fixed if s == -1 else int(s) for s in shape)
    elif fixed != num_devices:
        raise ValueError(
            f"mesh.shape {shape!r} multiplies to {fixed} devices but {num_devices} are given; "
            "use -1 for one axis or pass the devices to use"
        )
    return tuple(int(s) for s in shape)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with ``mesh.axes`` of sizes ``mesh.shape`` over ``devices`` (default: all).

    Device order comes from ``jax.make_mesh`` (it follows the physical topology on TPU/GPU).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_config, len(devices))
    axes = tuple(mesh_config.axes)
    return jax.make_mesh(shape, axes, axis_types=(_AXIS_TYPE,) * len(axes), devices=devices)


def abstract_mesh(mesh_config, num_devices: int) -> AbstractMesh:
    """The mesh ``make_mesh`` would build on ``num_devices`` devices, without the devices: for
    planning a pod's layout (``tree_shardings`` accepts it) on one machine."""
    shape = resolve_mesh_shape(mesh_config, num_devices)
    axes = tuple(mesh_config.axes)
    return AbstractMesh(shape, axes, axis_types=(_AXIS_TYPE,) * len(axes))


# ------------------------------------------------------------------------------------ rules


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Ordered ``(leaf regex, logical axis per dimension)`` rules and the logical -> mesh axes
    table. A logical axis (or ``None``) names one dimension; the table maps it to a mesh axis,
    a tuple of mesh axes (sharded over their product) or ``None`` (replicated)."""

    leaves: tuple[tuple[str, tuple[str | None, ...]], ...]
    logical_axes: tuple[tuple[str, MeshAxes], ...]

    def __post_init__(self):
        table = dict(self.logical_axes)
        for pattern, axes in self.leaves:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"sharding rule {pattern!r}: invalid regex: {err}") from None
            for name in axes:
                if name is not None and name not in table:
                    raise ValueError(
                        f"sharding rule {pattern!r} uses logical axis {name!r}, which the "
                        f"logical-axis table does not map (known: {sorted(table)})"
                    )

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        """The mesh axes one logical axis is sharded over (empty: replicated)."""
        if logical is None:
            return ()
        target = dict(self.logical_axes)[logical]
        if target is None:
            return ()
        return (target,) if isinstance(target, str) else tuple(target)


_ANY = r"(?:.*/)?"  # any container prefix: "model/", optimizer state "0/mu/", ...

# The logical axis of a stacked layer leaf's leading [num_layers] dimension, and the paths that
# have one: under a "layers/" component not followed by an integer index.
STACKED_LAYERS_AXIS = "layers"
_STACKED_LAYER_PATH = re.compile(r"(?:^|.*/)layers/(?!\d+(?:/|$))[^/].*")

LLAMA_LEAF_RULES = (
    (_ANY + r"embed_tokens/(?:embedding|weight)", ("vocab", "embed")),
    (_ANY + r"lm_head/kernel", ("embed", "vocab")),
    (_ANY + r"self_attn/[qkv]_proj/kernel", ("embed", "heads")),
    (_ANY + r"self_attn/[qkv]_proj/bias", ("heads",)),
    (_ANY + r"self_attn/o_proj/kernel", ("heads", "embed")),
    (_ANY + r"mlp/(?:gate|up)_proj/kernel", ("embed", "mlp")),
    (_ANY + r"mlp/(?:gate|up)_proj/bias", ("mlp",)),
    (_ANY + r"mlp/down_proj/kernel", ("mlp", "embed")),
    # Biases over the hidden size and every RMSNorm gain (input/post_attention/pre_feedforward
    # layernorms, the final norm): tiny, read whole by every device.
    (_ANY + r"(?:self_attn/o_proj|mlp/down_proj)/bias", ("norm",)),
    (_ANY + r"[^/]*norm[^/]*/(?:weight|scale)", ("norm",)),
)

LLAMA_LOGICAL_AXES = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    (STACKED_LAYERS_AXIS, None),
)

LLAMA_RULES = ShardingRules(leaves=LLAMA_LEAF_RULES, logical_axes=LLAMA_LOGICAL_AXES)


@dataclasses.dataclass(frozen=True)
class _LeafPlan:
    path: str
    shape: tuple[int, ...]
    spec: PartitionSpec
    wanted_devices: int  # devices the rule asked to spread the leaf over
    devices: int  # devices it is spread over after the divisibility fallback


def _spec_entry(axes: list[str]):
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _plan_leaf(path: str, shape: tuple[int, ...], rules: ShardingRules, sizes) -> _LeafPlan:
    if not shape:  # a scalar: nothing to partition, no rule needed
        return _LeafPlan(path, shape, PartitionSpec(), 1, 1)
    indexed = [(pattern, i) for i, (pattern, _) in enumerate(rules.leaves)]
    try:
        pattern, logical = rules.leaves[tree_lib.match_rule(path, indexed)]
    except KeyError:
        raise ValueError(
            f"leaf '{path}' (shape {shape}) matches no sharding rule "
            f"(patterns: {[p for p, _ in rules.leaves]}); add a rule for it"
        ) from None
    stacked = len(logical) + 1 == len(shape) and _STACKED_LAYER_PATH.fullmatch(path)
    if stacked:
        table = dict(rules.logical_axes)
        logical = (STACKED_LAYERS_AXIS if STACKED_LAYERS_AXIS in table else None, *logical)
    if len(logical) != len(shape):
        raise ValueError(
            f"leaf '{path}' has shape {shape} but sharding rule {pattern!r} names "
            f"{len(logical)} logical axes {logical}"
        )
    requested = [rules.mesh_axes(name) for name in logical]
    flat = [axis for axes in requested for axis in axes]
    for axis in flat:
        if axis not in sizes:
            raise ValueError(
                f"leaf '{path}': logical axes {logical} map to mesh axis {axis!r}, which the "
                f"mesh (axes {tuple(sizes)}) does not have"
            )
    if len(set(flat)) != len(flat):
        raise ValueError(
            f"leaf '{path}': logical axes {logical} map to mesh axes {requested}, which use "
            "one mesh axis twice"
        )

    kept: list[list[str]] = [[] for _ in shape]
    displaced: list[tuple[int, str]] = []
    for dim, axes in enumerate(requested):
        for axis in axes:
            if shape[dim] % (math.prod(sizes[a] for a in kept[dim]) * sizes[axis]) == 0:
                kept[dim].append(axis)
            else:
                displaced.append((dim, axis))
    for dim, axis in displaced:
        for other in range(len(shape)):
            if other == dim or (stacked and other == 0):
                continue
            if shape[other] % (math.prod(sizes[a] for a in kept[other]) * sizes[axis]) == 0:
                kept[other].append(axis)
                logger.warning(
                    "sharding: leaf '%s' shape %s: mesh axis '%s' (size %d) does not divide "
                    "dimension %d (%d); sharded along dimension %d instead",
                    path, shape, axis, sizes[axis], dim, shape[dim], other,
                )
                break
        else:
            logger.warning(
                "sharding: leaf '%s' shape %s: mesh axis '%s' (size %d) divides no dimension; "
                "replicated along it",
                path, shape, axis, sizes[axis],
            )
    return _LeafPlan(
        path=path,
        shape=shape,
        spec=PartitionSpec(*(_spec_entry(axes) for axes in kept)),
        wanted_devices=math.prod(sizes[a] for a in flat),
        devices=math.prod(sizes[a] for axes in kept for a in axes),
    )


def _plan(tree: Pytree, rules: ShardingRules, mesh: MeshLike):
    paths, leaves, treedef = tree_lib.flatten(tree)
    sizes = dict(mesh.shape)
    plans = [_plan_leaf(p, tuple(np.shape(leaf)), rules, sizes) for p, leaf in zip(paths, leaves)]
    return plans, treedef


def partition_specs(tree: Pytree, rules: ShardingRules, mesh: MeshLike) -> Pytree:
    """A ``PartitionSpec`` per leaf of ``tree`` (arrays, ``jax.ShapeDtypeStruct``s, or anything
    with a shape), with the divisibility fallback of the module docstring."""
    plans, treedef = _plan(tree, rules, mesh)
    return jax.tree_util.tree_unflatten(treedef, [plan.spec for plan in plans])


def tree_shardings(
    tree: Pytree,
    rules: ShardingRules,
    mesh: MeshLike,
    *,
    max_unsharded_fraction: float | None = None,
) -> Pytree:
    """A ``NamedSharding`` on ``mesh`` per leaf of ``tree``: parameters, gradients, optimizer
    state, masks; concrete or abstract (``jax.eval_shape`` output) alike.

    With ``max_unsharded_fraction``, raises ``ValueError`` if the leaves that the fallback left
    whole on every device (though their rule asked for more than one) hold more than that
    fraction of all entries, naming the fraction and the largest such leaves.
    """
    plans, treedef = _plan(tree, rules, mesh)
    if max_unsharded_fraction is not None:
        _check_unsharded(plans, max_unsharded_fraction)
    return jax.tree_util.tree_unflatten(
        treedef, [NamedSharding(mesh, plan.spec) for plan in plans]
    )


def _check_unsharded(plans: list[_LeafPlan], limit: float) -> None:
    total = sum(math.prod(p.shape) for p in plans)
    unsharded = [p for p in plans if p.wanted_devices > 1 and p.devices == 1]
    count = sum(math.prod(p.shape) for p in unsharded)
    if total and count / total > limit:
        largest = sorted(unsharded, key=lambda p: -math.prod(p.shape))[:5]
        names = ", ".join(f"'{p.path}' {p.shape}" for p in largest)
        raise ValueError(
            f"{count / total:.2%} of the parameters ({count} of {total} entries) would be "
            f"replicated on every device because the mesh axes their rules ask for divide none "
            f"of their dimensions, more than mesh.max_unsharded_fraction={limit}; largest: "
            f"{names}. Choose mesh.shape sizes that divide these dimensions."
        )


def shardings(
    tree: Pytree, mesh: MeshLike, mesh_config, rules: ShardingRules = LLAMA_RULES
) -> Pytree:
    """``tree_shardings`` guarded by ``mesh_config.max_unsharded_fraction``."""
    return tree_shardings(
        tree, rules, mesh, max_unsharded_fraction=float(mesh_config.max_unsharded_fraction)
    )


def _devices_spanned(sharding: NamedSharding) -> int:
    sizes = dict(sharding.mesh.shape)
    axes = [axis for entry in sharding.spec if entry
            for axis in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(sizes[axis] for axis in axes)


def replicated_fraction(tree: Pytree, sharding_tree: Pytree) -> float:
    """Fraction of ``tree``'s entries whose ``NamedSharding`` keeps them whole on every device
    (for whatever reason: by design or by the divisibility fallback)."""
    leaves = tree_lib.flatten(tree)[1]
    sharding_leaves = tree_lib.flatten(sharding_tree)[1]
    sizes = [math.prod(np.shape(leaf)) for leaf in leaves]
    replicated = sum(
        size for size, sharding in zip(sizes, sharding_leaves, strict=True)
        if _devices_spanned(sharding) == 1
    )
    return replicated / sum(sizes) if sum(sizes) else 0.0


def shard(tree: Pytree, sharding_tree: Pytree) -> Pytree:
    """``tree`` placed with ``sharding_tree`` (``jax.device_put``); the two must hold the same
    leaf paths (``ValueError`` names the first that differs)."""
    paths = tree_lib.leaf_paths(tree)
    sharding_paths = tree_lib.leaf_paths(sharding_tree)
    for a, b in zip([*paths, None], [*sharding_paths, None]):
        if a != b:
            raise ValueError(
                f"shard: tree leaf {a!r} meets sharding leaf {b!r}; the shardings must come "
                "from tree_shardings on a tree of the same structure"
            )
    return jax.device_put(tree, sharding_tree)
