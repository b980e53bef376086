"""Learning-rate schedules for the SFT stages, with their numbers in the optimizer state.

With ``lr`` the peak, ``w`` the warm-up steps, ``T`` the total steps and
``end = final_lr_ratio * lr``, the rate at step ``t`` (updates applied so far) is
``lr * t / w`` for ``t < w``, and afterwards, with ``f = clip((t - w) / max(T - w, 1), 0, 1)``:

- ``"constant"``: ``lr``;
- ``"cosine"``: ``end + (lr - end) * (1 + cos(pi f)) / 2``;
- ``"linear"``: ``lr + (end - lr) * f``,

so cosine and linear hold ``end`` after ``T``. ``schedule_value`` is the one formula; the
numbers and the step count are optimizer state (``ScheduleState``), not constants of the
compiled update, so one compiled step serves stages of any length, peak and warm-up.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpift_jax import _config_fields as fields

__all__ = [
    "SCHEDULES",
    "ScheduleNumbers",
    "ScheduleState",
    "schedule_numbers",
    "schedule_kind",
    "schedule_value",
    "learning_rate_schedule",
    "scale_by_schedule",
]

SCHEDULES = ("cosine", "constant", "linear")


class ScheduleNumbers(NamedTuple):
    """The numbers of a learning-rate schedule; in the optimizer state they are float32 arrays,
    so a compiled step serves schedules of any length and peak."""

    learning_rate: Any
    warmup_steps: Any
    total_steps: Any
    final_lr_ratio: Any


class ScheduleState(NamedTuple):
    """``count``: updates applied so far (int32); ``numbers``: the schedule (float32)."""

    count: jax.Array
    numbers: ScheduleNumbers


def schedule_numbers(config) -> ScheduleNumbers:
    """The checked schedule numbers of an optimizer config (as float32 NumPy scalars)."""
    lr = fields.number(config, "learning_rate", 0.0, open_low=True)
    warmup = fields.steps(config, "warmup_steps", 0)
    total = fields.steps(config, "total_steps", 1)
    ratio = fields.field(config, "final_lr_ratio", optional=True, default=0.0)
    if warmup > total:
        raise ValueError(
            f"optimizer config 'warmup_steps' ({warmup}) exceeds 'total_steps' ({total})"
        )
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 <= ratio <= 1:
        raise ValueError(f"optimizer config 'final_lr_ratio' must be in [0, 1], got {ratio!r}")
    return ScheduleNumbers(*(np.float32(v) for v in (lr, warmup, total, ratio)))


def schedule_kind(config) -> str:
    """The checked ``schedule`` field of an optimizer config (one of ``SCHEDULES``)."""
    kind = fields.field(config, "schedule")
    if kind not in SCHEDULES:
        raise ValueError(
            f"optimizer config 'schedule' must be one of {', '.join(SCHEDULES)}, got {kind!r}"
        )
    return kind


def schedule_value(kind: str, step, values: ScheduleNumbers) -> jax.Array:
    """The learning rate at ``step`` (0-based count of updates applied), float32; the one
    formula behind ``learning_rate_schedule`` and the in-state schedule of ``make``.

    Linear warm-up ``lr * step / warmup`` for ``step < warmup``, then with
    ``f = clip((step - warmup) / max(total - warmup, 1), 0, 1)`` and ``end = final_lr_ratio * lr``:
    ``"constant"``: ``lr``; ``"cosine"``: ``end + (lr - end) * (1 + cos(pi f)) / 2``;
    ``"linear"``: ``lr + (end - lr) * f``.
    """
    f32 = jnp.float32
    step = jnp.asarray(step, f32)
    lr, warmup, total, ratio = (jnp.asarray(v, f32) for v in values)
    end = ratio * lr
    fraction = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    if kind == "constant":
        after = lr
    elif kind == "cosine":
        after = end + (lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * fraction))
    elif kind == "linear":
        after = lr + (end - lr) * fraction
    else:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    return jnp.where(step < warmup, lr * step / jnp.maximum(warmup, 1.0), after)


def learning_rate_schedule(config) -> optax.Schedule:
    """Step -> learning rate (``schedule_value`` with the config's numbers): linear warm-up
    0 -> ``learning_rate`` over ``warmup_steps``, then

    - ``"constant"``: ``learning_rate``;
    - ``"cosine"``: ``end + (lr - end) * (1 + cos(pi * s / d)) / 2``;
    - ``"linear"``: ``lr + (end - lr) * s / d``,

    with ``s`` the steps since warm-up, ``d = total_steps - warmup_steps`` and
    ``end = final_lr_ratio * learning_rate``; the schedule holds ``end`` after ``total_steps``.
    """
    kind = schedule_kind(config)
    fixed = schedule_numbers(config)
    return lambda step: schedule_value(kind, step, fixed)


def scale_by_schedule(kind: str, values: ScheduleNumbers) -> optax.GradientTransformation:
    """``u' = -schedule_value(kind, count, values) * u``, with ``count`` and ``values`` in the
    state: the schedule's length and peak are data, so one compiled step serves every stage.

    ``values`` may be tracers (``init`` under ``jit`` with the numbers as arguments).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")

    def init_fn(params):
        del params
        return ScheduleState(
            count=jnp.zeros((), jnp.int32),
            numbers=ScheduleNumbers(*(jnp.asarray(v, jnp.float32) for v in values)),
        )

    def update_fn(updates, state, params=None):
        del params
        step_size = -schedule_value(kind, state.count, state.numbers)
        updates = jax.tree.map(lambda u: jnp.asarray(step_size, u.dtype) * u, updates)
        return updates, ScheduleState(count=state.count + 1, numbers=state.numbers)

    return optax.GradientTransformation(init_fn, update_fn)
