"""The transplant half of CPI fusion: which value an entry inside the task cores takes.

Step 4 of CPI-FT (arXiv 2508.21741) copies each task's core entries from its own model. An entry
in one core C_i takes theta_i; where cores overlap the paper does not say, so ``overlap`` decides:

- ``"max_delta"`` (default): the task with the largest |theta_i - backbone|, ties to the lowest
  task index (the task that moved the entry most owns it);
- ``"mean"``: the mean of the overlapping tasks' values;
- ``"first"``: the lowest task index.

Shared by ``fusion``'s definition and its CPU kernel (``fusion_kernel``), so both apply the
same rule with the same float32 operations.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["OVERLAP_RULES", "check_overlap", "core_value"]

OVERLAP_RULES = ("max_delta", "mean", "first")


def check_overlap(overlap: str) -> None:
    """Raises ``ValueError`` listing the rules unless ``overlap`` is one of ``OVERLAP_RULES``."""
    if overlap not in OVERLAP_RULES:
        raise ValueError(f"unknown overlap rule {overlap!r}; available: {', '.join(OVERLAP_RULES)}")


def core_value(backbone: jax.Array, models: Sequence[jax.Array], cores: Sequence[jax.Array],
               rule: str) -> tuple[jax.Array, jax.Array | None]:
    """(core value, index of the task it came from) per entry, from float32 ``backbone`` and
    ``models`` and bool ``cores``; the index is None for ``"mean"`` (every overlapping task
    contributes). Meaningless (and -1 as index) outside every core."""
    if rule == "mean":
        total = sum(jnp.where(m, x, 0.0) for m, x in zip(cores, models))
        count = sum(m.astype(jnp.float32) for m in cores)
        return total / jnp.maximum(count, 1.0), None
    if rule == "first":
        value, winner = models[-1], jnp.int32(-1)
        for i in reversed(range(len(models))):
            value, winner = jnp.where(cores[i], models[i], value), jnp.where(cores[i], i, winner)
        return value, winner
    # max_delta: strictly larger |delta| takes over, so ties stay with the lower index.
    value = models[0]
    best = jnp.where(cores[0], jnp.abs(models[0] - backbone), -1.0)
    winner = jnp.where(cores[0], 0, -1)
    for i in range(1, len(models)):
        delta = jnp.abs(models[i] - backbone)
        take = cores[i] & (delta > best)
        value = jnp.where(take, models[i], value)
        best = jnp.where(take, delta, best)
        winner = jnp.where(take, i, winner)
    return value, winner
