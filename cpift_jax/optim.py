"""Element-wise parameter freezing for optax, and the AdamW factory used for SFT stages.

CPI-FT (arXiv 2508.21741, Sec. 3, step 5) trains stage by stage with the core entries of earlier
groups frozen *element-wise*. ``optax.masked`` does not freeze (masked-out leaves pass their raw
gradient through) and ``optax.freeze`` / ``multi_transform`` work per leaf, so ``freeze`` is a
small GradientTransformation that replaces the update of every frozen entry by ``-0.0``:

- with ``jnp.where`` rather than a multiply, because ``0 * NaN = NaN``;
- by ``-0.0`` rather than ``+0.0``, because ``p + (-0.0)`` returns ``p`` bit for bit for every
  ``p`` (``-0.0 + 0.0`` would give ``+0.0``), so ``optax.apply_updates`` leaves frozen entries
  bit-identical.

The mask lives in the transformation's *state*, not in a closure: a closed-over array becomes a
constant embedded in every jitted program that calls ``update`` (measured: a 20M-entry mask adds
40 MB of HLO text and 0.5 s of compile time; XLA protos cap out at 2 GB), whereas state is an
ordinary argument of the jitted step. It has the parameters' structure (``FreezeState``), so the
sharding rules that place a parameter place its mask too. Likewise the learning-rate schedule's
numbers and step count are state (``ScheduleState``, in ``schedules``, re-exported here): one
compiled step serves stages of any length, peak and warm-up.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cpift_jax import _config_fields as fields
from cpift_jax import masks as masks_lib
from cpift_jax import tree as tree_lib
# The schedule lives in `schedules`; re-exported so `optim.<name>` keeps working.
from cpift_jax.schedules import (  # noqa: F401
    SCHEDULES,
    ScheduleNumbers,
    ScheduleState,
    learning_rate_schedule,
    scale_by_schedule,
    schedule_kind,
    schedule_numbers,
    schedule_value,
)

Pytree = Any

__all__ = [
    "FreezeState",
    "FreezeAroundState",
    "freeze",
    "freeze_around",
    "make",
    "default_config",
    "learning_rate_schedule",
    "schedule_value",
    "schedule_numbers",
    "scale_by_schedule",
    "ScheduleNumbers",
    "ScheduleState",
    "compile_key",
    "freeze_pattern",
    "split_freeze_mask",
    "join_freeze_mask",
    "SCHEDULES",
    "DEFAULT_WEIGHT_DECAY_MASK",
]


class FreezeState(NamedTuple):
    """The freeze mask with the parameters' structure (so sharding rules that match a leaf
    path's tail give it its parameter's sharding): a bool array per leaf, or None where the
    whole leaf's freezing is fixed by a Python bool (or None) in the user's mask."""

    mask: Any


def _is_static(leaf) -> bool:
    return leaf is None or isinstance(leaf, (bool, np.bool_))


def _mask_by_path(mask: Pytree) -> dict[str, Any]:
    """Leaf path -> mask leaf; None and Python bools are kept as leaves (whole-leaf settings)."""
    with_path, _ = jax.tree_util.tree_flatten_with_path(mask, is_leaf=_is_static)
    return {tree_lib.path_str(kp): leaf for kp, leaf in with_path}


def freeze_pattern(mask: Pytree | None) -> tuple | None:
    """The part of a freeze mask that shapes a compiled program, hashable: ``((path, kind),
    ...)`` with kind ``"array"`` for an element-wise leaf and True / False for a whole leaf
    (None counts as False); None for no mask. Masks with one pattern share a compiled step."""
    if mask is None:
        return None
    return tuple(
        (path, "array" if not _is_static(leaf) else bool(leaf))
        for path, leaf in _mask_by_path(mask).items()
    )


def split_freeze_mask(mask: Pytree, params: Pytree) -> tuple[tuple, Pytree]:
    """``(freeze_pattern(mask), arrays)``: ``mask`` checked against ``params`` (ValueError
    naming the leaf) and its bool arrays in the parameters' structure, None at whole-leaf
    entries. ``join_freeze_mask(pattern, arrays)`` gives an equivalent mask back."""
    entries = masks_lib.check_mask(params, mask, whole_leaves=True)
    treedef = jax.tree_util.tree_structure(params)
    arrays = jax.tree_util.tree_unflatten(
        treedef, [None if _is_static(m) else m for m in entries]
    )
    return freeze_pattern(mask), arrays


def join_freeze_mask(pattern: tuple, arrays: Pytree) -> Pytree:
    """The mask that ``split_freeze_mask`` split: the whole-leaf values of ``pattern`` put back
    at the None entries of ``arrays`` (arrays or tracers elsewhere)."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(arrays, is_leaf=lambda x: x is None)
    kinds = dict(pattern)
    leaves = []
    for keypath, leaf in with_path:
        path = tree_lib.path_str(keypath)
        kind = kinds.get(path)
        if kind is None:
            raise ValueError(f"leaf '{path}' is in the mask arrays but not in the freeze pattern")
        leaves.append(leaf if kind == "array" else kind)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _frozen_update(update: jax.Array, frozen) -> jax.Array:
    # -0.0 is the additive identity for every float, including -0.0 itself.
    negative_zero = jnp.array(-0.0, dtype=update.dtype)
    if frozen is True:
        return jnp.full_like(update, negative_zero)
    return jnp.where(frozen, negative_zero, update)


def freeze(mask: Pytree | None) -> optax.GradientTransformation:
    """Replaces the update of every entry where ``mask`` is True by ``-0.0``.

    ``u'[i] = -0.0 if mask[i] else u[i]``; afterwards ``optax.apply_updates`` leaves masked
    entries bit-identical (also NaN gradients, ``-0.0`` or bf16 parameters).

    Args:
      mask: a pytree with the parameters' leaf paths whose leaves are bool arrays of the
        parameter's shape (True = frozen), or a Python bool / None for a whole leaf (None and
        False: nothing frozen; True: the whole leaf frozen). ``mask=None``: nothing frozen.
        The mask is checked against ``params`` in ``init`` (ValueError naming the leaf path) and
        its arrays are kept in the returned ``FreezeState`` in the parameters' structure.
        Call ``init`` outside ``jit``, or under ``jit`` with the mask's arrays as arguments,
        so that the mask is not baked into a compiled program as a constant.
    """
    by_path = {} if mask is None else _mask_by_path(mask)
    # The whole-leaf settings are all that `update` needs besides the state; keeping the mask
    # arrays out of its closure lets a cached compiled step outlive the mask it was built for.
    whole_leaves = {path: bool(leaf) for path, leaf in by_path.items() if _is_static(leaf)}

    def init_fn(params):
        if mask is None:
            entries = [None] * len(jax.tree_util.tree_leaves(params))
        else:
            entries = masks_lib.check_mask(params, mask, whole_leaves=True)
        leaves = [None if _is_static(m) else jnp.asarray(m, dtype=jnp.bool_) for m in entries]
        treedef = jax.tree_util.tree_structure(params)
        return FreezeState(mask=jax.tree_util.tree_unflatten(treedef, leaves))

    def update_fn(updates, state, params=None):
        del params
        paths, leaves, treedef = tree_lib.flatten(updates)
        try:
            mask_leaves = treedef.flatten_up_to(state.mask)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"the freeze mask in the optimizer state does not have the updates' structure "
                f"({len(leaves)} leaves, first '{paths[0] if paths else None}'): {err}"
            ) from None
        out = []
        for path, update, m in zip(paths, leaves, mask_leaves):
            if m is None:
                out.append(_frozen_update(update, True) if whole_leaves.get(path) else update)
            else:
                out.append(_frozen_update(update, m))
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformation(init_fn, update_fn)


class FreezeAroundState(NamedTuple):
    freeze: FreezeState
    inner: Any


def freeze_around(
    inner: optax.GradientTransformation, mask: Pytree | None
) -> optax.GradientTransformation:
    """Runs ``inner`` on gradients with frozen entries zeroed, then freezes its output again.

    Zeroing before ``inner`` keeps its statistics clean: Adam moments stay exactly 0 at frozen
    entries, a NaN/Inf gradient there cannot poison them, and a global-norm clip measures only
    the trainable entries. Freezing after ``inner`` stops weight decay and the learning rate
    from moving a frozen entry. The mask is stored once for both passes.
    """
    mask_tx = freeze(mask)
    mask_init, mask_update = mask_tx.init, mask_tx.update  # update's closure holds no arrays

    def init_fn(params):
        return FreezeAroundState(freeze=mask_init(params), inner=inner.init(params))

    def update_fn(updates, state, params=None):
        updates, _ = mask_update(updates, state.freeze)
        updates, inner_state = inner.update(updates, state.inner, params)
        updates, _ = mask_update(updates, state.freeze)
        return updates, FreezeAroundState(freeze=state.freeze, inner=inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


# Leaves that get no weight decay by default: biases and anything inside a module whose name
# contains "norm" (RMSNorm / LayerNorm scales), as is usual for transformer fine-tuning.
DEFAULT_WEIGHT_DECAY_MASK = (
    (r"(.*/)?bias", False),
    (r"(.*/)?[^/]*norm[^/]*/.*", False),
    (r".*", True),
)


def default_config() -> ml_collections.ConfigDict:
    """AdamW settings of the usual full-parameter SFT recipe (Stanford Alpaca / HF Trainer).

    The paper (arXiv 2508.21741) gives no optimiser settings; these are the common LLaMA SFT
    defaults, and experiment configs override them (toy models want a larger learning rate).
    """
    config = ml_collections.ConfigDict()
    config.learning_rate = 2e-5  # peak learning rate (Alpaca recipe for 7B models)
    config.warmup_steps = 30  # linear warm-up from 0 to the peak (3% of total_steps)
    config.total_steps = 1000  # length of the schedule, warm-up included
    config.schedule = "cosine"  # after warm-up: "cosine" | "constant" | "linear" decay
    config.final_lr_ratio = 0.0  # cosine/linear end at final_lr_ratio * learning_rate
    config.b1 = 0.9
    config.b2 = 0.999
    config.eps = 1e-8
    config.weight_decay = 0.0  # decoupled (AdamW): update += weight_decay * param, times lr
    config.weight_decay_mask = DEFAULT_WEIGHT_DECAY_MASK  # ordered (regex, bool) rules
    config.grad_clip_norm = 1.0  # clip by global norm; 0 or None: no clipping
    return config


def _decay_rules(config) -> list[tuple[str, bool]] | None:
    rules = fields.field(config, "weight_decay_mask", optional=True)
    if rules is None:
        return None
    checked = []
    for rule in rules if isinstance(rules, (list, tuple)) else [rules]:
        if not (isinstance(rule, (list, tuple)) and len(rule) == 2 and isinstance(rule[0], str)
                and isinstance(rule[1], (bool, np.bool_))):
            raise ValueError(
                "optimizer config 'weight_decay_mask' must be a list of (regex, bool) rules "
                f"(True = decayed, first full match wins), got {rule!r}"
            )
        checked.append((rule[0], bool(rule[1])))
    return checked


def compile_key(config) -> tuple:
    """The optimizer settings that shape the compiled update, checked and hashable: everything
    but the schedule numbers (which live in the state)."""
    b1 = fields.number(config, "b1", 0.0, 1.0, open_high=True)
    b2 = fields.number(config, "b2", 0.0, 1.0, open_high=True)
    eps = fields.number(config, "eps", 0.0, open_low=True)
    weight_decay = fields.number(config, "weight_decay", 0.0)
    clip = fields.field(config, "grad_clip_norm")
    if clip is not None:
        clip = fields.number(config, "grad_clip_norm", 0.0)
    rules = _decay_rules(config)
    return (schedule_kind(config), b1, b2, eps, weight_decay, clip,
            None if rules is None else tuple(rules))


def make(config, frozen: Pytree | None = None, *,
         schedule: ScheduleNumbers | None = None) -> optax.GradientTransformation:
    """AdamW with gradient clipping, a learning-rate schedule and element-wise freezing.

    Chain: ``clip_by_global_norm -> scale_by_adam -> add_decayed_weights ->
    scale_by_schedule``, wrapped by ``freeze_around(.., frozen)`` so frozen entries are
    zeroed before the chain (clean Adam moments, NaN gradients there are harmless, the clip
    norm counts only trainable entries) and after it (decay and lr cannot move them): frozen
    entries stay bit-identical under ``optax.apply_updates``. The schedule's numbers and step
    count are optimizer state (``ScheduleState``), not constants of the compiled update.

    Args:
      config: a ConfigDict (or any object with these attributes) as in ``default_config()``;
        ``weight_decay_mask`` and ``final_lr_ratio`` are optional (absent: decay every leaf,
        decay to 0).
      frozen: element-wise freeze mask (see ``freeze``); None: nothing frozen and no wrapper.
      schedule: schedule numbers for ``init`` instead of the config's (arrays or tracers).
    """
    kind, b1, b2, eps, weight_decay, clip, rules = compile_key(config)
    values = schedule_numbers(config) if schedule is None else schedule

    chain = []
    if clip:
        chain.append(optax.clip_by_global_norm(clip))
    chain.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if weight_decay > 0.0:
        decay_mask = None
        if rules is not None:
            decay_mask = lambda params: tree_lib.resolve_rules(params, list(rules))  # noqa: E731
        chain.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
    chain.append(scale_by_schedule(kind, values))
    tx = optax.chain(*chain)
    return tx if frozen is None else freeze_around(tx, frozen)
