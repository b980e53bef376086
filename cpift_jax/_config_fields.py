"""Checked reads of optimizer-config fields, shared by ``optim`` and ``schedules``: each
returns the field's value or raises ValueError naming the field and what it must be."""

from __future__ import annotations

import math
import numbers

__all__ = ["field", "number", "steps"]


def field(config, name: str, *, optional: bool = False, default=None):
    if not hasattr(config, name):
        if optional:
            return default
        raise ValueError(f"optimizer config has no field '{name}' (see optim.default_config())")
    return getattr(config, name)


def number(config, name: str, low: float, high: float = math.inf, *, open_low=False,
           open_high=False) -> float:
    """The finite number ``config.<name>``, checked to lie in the given interval."""
    value = field(config, name)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low)
    ok = ok and (value < high if open_high else value <= high)
    if not ok:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(
            f"optimizer config '{name}' must be a finite number in {interval}, got {value!r}"
        )
    return float(value)


def steps(config, name: str, low: int) -> int:
    value = field(config, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"optimizer config '{name}' must be an integer >= {low}, got {value!r}")
    return int(value)
