"""Magnitude top-k selection shared by TIES, breadcrumbs, stitch and consensus (not an operator).

A density keeps ``select.count_for_fraction(density, N)`` = floor(density * N) entries of
|delta_i| (the one count rule, shared with ``masks.core_mask``; mergekit's ``int(density * n)``
too), exactly that many: entries tied at the cut are taken earliest first (leaf order, then
row-major), as in ``core_mask``. mergekit's argsort also keeps exactly k but breaks ties in
whatever order its sort leaves them. ``scope="leaf"`` ranks every leaf separately (mergekit's
per-tensor rule); ``scope="global"`` ranks the whole task vector, N being its total size (the
papers' rule).

The selection is a ``Keep`` per leaf: float32 cuts that the operator's own leaf program
compares |delta_i| against (so no mask is materialised), or explicit masks where ties at a cut
had to be split or the inputs are traced. Thresholds come from ``select.top_k`` (exact k-th
largest by counting passes over ``|theta_i - base|``, no sort, no |delta| copy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpift_jax import select

SCOPES = ("leaf", "global")
_NONE = np.float32(np.nan)  # a cut no entry reaches


@dataclasses.dataclass(frozen=True)
class Keep:
    """Which entries of one leaf's task vectors are kept.

    ``cuts`` (n, 2) float32 and ``lasts`` (n, 2) int32: task i keeps the entries that
    ``select.selected(|delta_i|, cuts[i, 0], lasts[i, 0])`` takes and
    ``select.selected(|delta_i|, cuts[i, 1], lasts[i, 1])`` does not (a NaN cut takes
    nothing). ``masks``: a tuple of n bool arrays instead (traced inputs), or None.
    """

    cuts: jax.Array | np.ndarray | None
    lasts: jax.Array | np.ndarray | None = None
    masks: tuple | None = None

    def args(self) -> tuple:
        """(cuts, lasts, masks) as leaf-program arguments."""
        return self.cuts, self.lasts, self.masks


def kept(parts: Sequence[jax.Array], cuts, lasts, masks) -> list[jax.Array]:
    """Per task, the bool mask of the kept entries of ``parts`` (float32 task vectors); runs
    inside the operators' leaf programs."""
    if masks is not None:
        return list(masks)
    out = []
    for i, p in enumerate(parts):
        magnitude = jnp.abs(p)
        top = select.selected(magnitude, cuts[i, 0], lasts[i, 0])
        out.append(top & ~select.selected(magnitude, cuts[i, 1], lasts[i, 1]))
    return out


def _check_global(values: Sequence, name: str, paths) -> None:
    if len(set(values)) > 1:
        first = next(j for j, d in enumerate(values) if d != values[0])
        where = f" (leaf '{paths[first]}' has {values[first]}, not {values[0]})" if paths else ""
        raise ValueError(
            f"scope='global' ranks the whole task vector with one {name}, but per-leaf "
            f"values were given{where}; use scope='leaf' or a scalar {name}"
        )


def _top(pairs: list[tuple], density: float) -> select.TopK:
    size = sum(int(np.size(a)) for a, _ in pairs)
    return select.top_k(pairs, select.count_for_fraction(density, size))


def _leaf_keeps(base, models, outer: list[list[select.TopK]],
                inner: list[list[select.TopK]] | None) -> list[Keep]:
    """``outer[i][j]``: task i's selection at leaf j (``inner``: its excluded top, or None)."""
    keeps = []
    for j, (b, xs) in enumerate(zip(base, models)):
        tops = [(outer[i][j], inner[i][j] if inner else None) for i in range(len(xs))]
        if all(o.masks is None and (n is None or n.masks is None) for o, n in tops):
            cuts = [[o.value, n.value if n is not None else _NONE] for o, n in tops]
            lasts = [[o.last[0], n.last[0] if n is not None else -1] for o, n in tops]
            keeps.append(Keep(np.asarray(cuts, np.float32), np.asarray(lasts, np.int32)))
            continue
        masks = []
        for i, (o, n) in enumerate(tops):
            score = jnp.abs(jnp.asarray(xs[i], jnp.float32) - jnp.asarray(b, jnp.float32))
            mask = o.leaf_mask(0, score)
            if n is not None:
                mask = mask & ~n.leaf_mask(0, score)
            masks.append(mask)
        keeps.append(Keep(None, None, tuple(masks)))
    return keeps


def _per_task(base, models, densities, scope, paths) -> list[list[select.TopK]]:
    """``out[i][j]``: top-``density`` selection of task i at leaf j (a per-leaf view of a
    global selection)."""
    n = len(models[0])
    if scope == "leaf":
        return [[_top([(b, xs[i])], d) for b, xs, d in zip(base, models, densities)]
                for i in range(n)]
    _check_global(densities, "density", paths)
    out = []
    for i in range(n):
        top = _top([(b, xs[i]) for b, xs in zip(base, models)], densities[0])
        if top.masks is None:
            out.append([select.TopK(top.value, [last]) for last in top.last])
        else:
            out.append([select.TopK(top.value, masks=[m]) for m in top.masks])
    return out


def top_fraction(base, models, densities, scope: str, *, paths=None) -> list[Keep]:
    """Per leaf, the top-``density`` entries of every task vector ``|models[j][i] - base[j]|``
    (``base``: leaf list; ``models[j]``: the models' leaves j)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be 'leaf' or 'global', got {scope!r}")
    return _leaf_keeps(base, models, _per_task(base, models, densities, scope, paths), None)


def band(base, models, densities, gammas, scope: str, *, paths=None) -> list[Keep]:
    """Entries ranked below the top ``gamma`` fraction and within the next ``density`` fraction.

    ``top(gamma + density) & ~top(gamma)``: drops the largest outliers and the small tail
    (Model Breadcrumbs).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be 'leaf' or 'global', got {scope!r}")
    if scope == "global":
        _check_global(list(zip(densities, gammas)), "density and gamma", paths)
    upper = [min(1.0, g + d) for g, d in zip(gammas, densities)]
    outer = _per_task(base, models, upper, scope, paths)
    inner = _per_task(base, models, list(gammas), scope, paths)
    return _leaf_keeps(base, models, outer, inner)
