"""Linear, SLERP and CPI against written-out values and independent float64 numpy references.

The references re-derive each operator from its definition in plain numpy (argsort for top-k,
explicit angles for SLERP) and share no code with cpift_jax. The task-vector operators are
checked the same way in test_merges_reference.py.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from cpift_jax import merges
from merge_trees import as64, check, f32, fine_tunes, ref_fold, ref_slerp


# ---------------------------------------------------------------- numpy references


def core_masks_ref(models64, base64, fraction):
    """Per model, the floor(fraction * D) largest |delta| over all entries (global scope)."""
    sizes = [x.size for x in base64]
    k = math.floor(fraction * sum(sizes))
    out = []
    for leaves in models64:
        flat = np.concatenate([np.abs(x - b).ravel() for x, b in zip(leaves, base64)])
        mask = np.zeros(flat.size, bool)
        mask[np.argsort(-flat, kind="stable")[:k]] = True
        out.append(np.split(mask, np.cumsum(sizes)[:-1]))
    return out


def cpi_ref(models, base, fraction, overlap="max_delta"):
    base64 = as64(base)
    models64 = [as64(m) for m in models]
    masks = core_masks_ref(models64, base64, fraction)
    out = []
    for j, b in enumerate(base64):
        xs = [m[j].ravel() for m in models64]
        ms = [m[j] for m in masks]
        union = np.logical_or.reduce(ms)
        merged = np.zeros_like(xs[0])
        # SLERP of the non-core entries alone (norms and angles over them only).
        merged[~union] = ref_fold([x[~union] for x in xs])
        for e in np.flatnonzero(union):
            holders = [i for i in range(len(xs)) if ms[i][e]]
            if overlap == "mean":
                merged[e] = np.mean([xs[i][e] for i in holders])
            elif overlap == "first":
                merged[e] = xs[holders[0]][e]
            else:
                merged[e] = xs[max(holders, key=lambda i: (abs(xs[i][e] - b.ravel()[e]), -i))][e]
        out.append(merged.reshape(b.shape))
    return out, masks


# ---------------------------------------------------------------- linear


def test_linear_written_out():
    a, b = {"w": f32([1.0, -2.0, 4.0])}, {"w": f32([3.0, 2.0, 0.0])}
    linear = merges.get("linear")
    check(linear([a, b]), [[2.0, 0.0, 2.0]])
    check(linear([a, b], weights=[3.0, 1.0]), [[1.5, -1.0, 3.0]])  # normalised to 3/4, 1/4
    check(linear([a, b], weights=[1.0, 1.0], normalize=False), [[4.0, 0.0, 4.0]])
    with pytest.raises(ValueError, match="sum to zero"):
        linear([a, b], weights=[1.0, -1.0])


def test_linear_matches_reference():
    models, _ = fine_tunes()
    w = [0.2, 0.5, 0.3]
    out = merges.get("linear")(models, weights=w)
    per_model = [as64(m) for m in models]
    check(out, [sum(wi * m[j] for wi, m in zip(w, per_model)) for j in range(3)])


# ---------------------------------------------------------------- slerp


def test_slerp_written_out():
    slerp = merges.get("slerp")
    a, b = {"w": f32([1.0, 0.0])}, {"w": f32([0.0, 1.0])}
    # A right angle, t = 1/3: 30 degrees from a.
    check(slerp([a, b], t=1 / 3), [[math.cos(math.pi / 6), math.sin(math.pi / 6)]])
    # Different norms: the coefficients mix the originals, so the norm is not kept at 1.
    c = {"w": f32([0.0, 3.0])}
    check(slerp([a, c], t=0.5), [[math.sqrt(0.5), 3 * math.sqrt(0.5)]])
    # Colinear: plain linear interpolation.
    check(slerp([a, {"w": f32([4.0, 0.0])}], t=0.25), [[1.75, 0.0]])


def test_slerp_two_models_with_per_leaf_t_matches_reference():
    models, _ = fine_tunes(2)
    t = {"a": 0.3, "b": [0.9], "c": 0.0}
    out = merges.get("slerp")(models, t=t)
    a, b = as64(models[0]), as64(models[1])
    expected = [ref_slerp(x, y, tj) for x, y, tj in zip(a, b, [0.3, 0.9, 0.0])]
    check(out, expected)


@pytest.mark.parametrize("weights", [None, (1.0, 2.0, 1.0)])
def test_slerp_fold_of_three_matches_reference(weights):
    models, _ = fine_tunes(3)
    out = merges.get("slerp")(models, weights=weights)
    per_model = [as64(m) for m in models]
    check(out, [ref_fold([m[j] for m in per_model], weights=weights) for j in range(3)])


def test_slerp_rows_match_reference_row_by_row():
    models, _ = fine_tunes(2)
    out = merges.get("slerp")(models, t=0.4, granularity="row")
    a, b = as64(models[0]), as64(models[1])
    expected = [np.stack([ref_slerp(r, s, 0.4) for r, s in zip(x, y)]) if x.ndim == 2
                else ref_slerp(x, y, 0.4) for x, y in zip(a, b)]
    check(out, expected)


# ---------------------------------------------------------------- cpi


def test_cpi_written_out():
    base = {"w": f32([0.0, 0.0, 0.0, 0.0])}
    m1, m2 = {"w": f32([5.0, 1.0, 1.0, 0.0])}, {"w": f32([0.0, 1.0, 1.0, -4.0])}
    # fraction 1/4: one core entry each (entry 0 for m1, entry 3 for m2), transplanted; the
    # non-core entries (1, 1) are the same in both models, so SLERP keeps them.
    out = merges.get("cpi")([m1, m2], base=base, fraction=0.25)
    check(out, [[5.0, 1.0, 1.0, -4.0]])
    # Overlapping cores: both models' largest update is entry 0.
    m3 = {"w": f32([-7.0, 1.0, 1.0, 0.0])}
    check(merges.get("cpi")([m1, m3], base=base, fraction=0.25), [[-7.0, 1.0, 1.0, 0.0]])
    check(merges.get("cpi")([m1, m3], base=base, fraction=0.25, overlap="first"),
          [[5.0, 1.0, 1.0, 0.0]])
    check(merges.get("cpi")([m1, m3], base=base, fraction=0.25, overlap="mean"),
          [[-1.0, 1.0, 1.0, 0.0]])


def test_cpi_requires_base():
    models, _ = fine_tunes(2)
    with pytest.raises(ValueError, match="cpi needs base"):
        merges.get("cpi")(models)


@pytest.mark.parametrize("overlap", ["max_delta", "mean", "first"])
def test_cpi_matches_reference(overlap):
    # A shared update makes the three cores overlap, so the overlap rule matters.
    models, base = fine_tunes(3, shared=1.0)
    expected, masks = cpi_ref(models, base, fraction=0.2, overlap=overlap)
    in_two = sum(np.concatenate(m).astype(int) for m in masks) >= 2
    assert in_two.sum() > 0 and np.logical_or.reduce([np.concatenate(m) for m in masks]).sum() < 49
    out = merges.get("cpi")(models, base=base, fraction=0.2, overlap=overlap)
    check(out, expected)


def test_cpi_with_another_inner_operator_keeps_the_transplant():
    models, base = fine_tunes(3)
    out = merges.get("cpi")(models, base=base, fraction=0.1, inner="linear")
    expected, masks = cpi_ref(models, base, fraction=0.1)
    union = [np.logical_or.reduce([m[j] for m in masks]) for j in range(3)]
    mean = [np.mean([m[j] for m in [as64(x) for x in models]], axis=0) for j in range(3)]
    for got, u, e, avg, b in zip(jax.tree.leaves(out), union, expected, mean, as64(base)):
        got = np.asarray(got, np.float64).ravel()
        np.testing.assert_allclose(got[u], e.ravel()[u], rtol=1e-6)
        np.testing.assert_allclose(got[~u], avg.ravel()[~u], rtol=1e-5, atol=1e-6)
