"""Leaf layouts for the fusion kernel: 2-D row views and their placement on a 1-D mesh.

Every leaf is processed as a 2-D *row view* ``(rows, cols)`` of its flattened entries, so one
reduction over the last axis gives per-row partial sums (short float32 accumulations, and rows
are the unit XLA's CPU backend spreads over threads):

- two or more axes: rows are the leading-index slices, ``(prod(shape[:-1]), shape[-1])``;
- zero or one axis: ``(size / 1024, 1024)`` when that splits evenly over the row parts, else
  ``(parts, size / parts)`` (``parts`` = number of devices, 1 without a mesh).

On a mesh (one axis, ``D`` devices) a leaf is *sharded* when its leading dimension is a
multiple of ``D``: each device then holds a contiguous block of whole rows, the same block as
``NamedSharding(mesh, P(axis))`` of the original array, so reshaping to the row view needs no
communication. Other leaves (odd leading sizes, scalars) run unsharded on the mesh's first
device; they are normally the small ones (norm scales, biases).
"""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["check_mesh", "row_view", "is_sharded", "place"]

_ROW = 1024


def check_mesh(mesh) -> str:
    """The name of the single axis of ``mesh``; ``ValueError`` for anything else."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if len(mesh.axis_names) != 1:
        raise ValueError(f"mesh must have exactly one axis, got axes {mesh.axis_names}")
    return mesh.axis_names[0]


def row_view(shape: tuple[int, ...], parts: int = 1) -> tuple[int, int]:
    """The ``(rows, cols)`` view of a leaf of ``shape`` (see the module docstring)."""
    size = math.prod(shape)
    if len(shape) >= 2:
        cols = shape[-1]
        return (size // cols if cols else math.prod(shape[:-1]), cols)
    if size % (parts * _ROW) == 0 and size > 0:
        return (size // _ROW, _ROW)
    if size % parts:
        raise ValueError(f"a leaf of {size} entries does not split into {parts} equal parts")
    return (parts, size // parts)


def is_sharded(shape: tuple[int, ...], mesh: Mesh | None) -> bool:
    """Whether a leaf of ``shape`` is split over ``mesh`` (leading dim a multiple of its size)."""
    return mesh is not None and len(shape) >= 1 and shape[0] % mesh.size == 0


def place(x: jax.Array, mesh: Mesh, sharded: bool) -> jax.Array:
    """``x`` split along its leading axis over ``mesh``, or on the mesh's first device.

    A no-op (no copy) when ``x`` is already laid out that way.
    """
    if sharded:
        target = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    else:
        target = jax.sharding.SingleDeviceSharding(mesh.devices.flat[0])
    if getattr(x, "sharding", None) is not None and x.sharding.is_equivalent_to(target, x.ndim):
        return x
    return jax.device_put(x, target)
