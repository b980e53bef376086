"""Each merge operator against written-out values and an independent float64 numpy reference.

The references below re-derive every operator from its paper in plain numpy (sorting for top-k,
loops for the Karcher mean), so they share no code with cpift_jax.merges.
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpift_jax import merges
from cpift_jax.merges import _task_vectors, dare
from merge_trees import as64, check, f32, fine_tunes


# ---------------------------------------------------------------- numpy references


def keep(n, density):
    """floor(density * n) with density read as the decimal it prints as (the count rule)."""
    return min(n, max(0, math.floor(Fraction(repr(float(density))) * n)))


def top_mask(scores, k):
    """Mask of the k largest entries (random data: no ties)."""
    flat = scores.ravel()
    mask = np.zeros(flat.size, bool)
    mask[np.argsort(-flat, kind="stable")[:k]] = True
    return mask.reshape(scores.shape)


def trim_ref(deltas_by_leaf, density, scope):
    """deltas_by_leaf[j][i]: task i, leaf j -> trimmed copies."""
    n_tasks = len(deltas_by_leaf[0])
    out = [[None] * n_tasks for _ in deltas_by_leaf]
    for i in range(n_tasks):
        leaves = [d[i] for d in deltas_by_leaf]
        if scope == "leaf":
            masks = [top_mask(np.abs(x), keep(x.size, density)) for x in leaves]
        else:
            flat = np.concatenate([np.abs(x).ravel() for x in leaves])
            m = top_mask(flat, keep(flat.size, density))
            masks, start = [], 0
            for x in leaves:
                masks.append(m[start : start + x.size].reshape(x.shape))
                start += x.size
        for j, (x, m) in enumerate(zip(leaves, masks)):
            out[j][i] = np.where(m, x, 0.0)
    return out


def ties_combine_ref(deltas, w, sign_method="sum"):
    d = np.stack(deltas)
    wc = np.asarray(w, np.float64).reshape((-1,) + (1,) * (d.ndim - 1))
    vote = (wc * d).sum(0) if sign_method == "sum" else np.sign(d).sum(0)
    gamma = np.sign(vote)
    agree = (np.sign(d) == gamma) & (d != 0)
    den = (wc * agree).sum(0)
    return np.where(den > 0, (wc * d * agree).sum(0) / np.where(den > 0, den, 1), 0.0)


def task_deltas(models, base):
    b = as64(base)
    per_model = [as64(m) for m in models]
    return b, [[pm[j] - b[j] for pm in per_model] for j in range(len(b))]


def sphere_ref(vectors, w, iters):
    """Weighted chordal (iters=0) or Karcher mean direction times the weighted mean norm."""
    x = np.stack([v.ravel() for v in vectors])
    w = np.asarray(w, np.float64) / np.sum(w)
    norms = np.linalg.norm(x, axis=1)
    u = x / norms[:, None]
    m = w @ u
    m /= np.linalg.norm(m)
    for _ in range(iters):
        g = np.zeros_like(m)
        for wi, ui in zip(w, u):
            c = np.clip(ui @ m, -1, 1)
            theta = np.arccos(c)
            if theta > 1e-15:
                g += wi * theta / np.sin(theta) * (ui - c * m)
        a = np.linalg.norm(g)
        if a > 0:
            m = np.cos(a) * m + np.sin(a) * g / a
        m /= np.linalg.norm(m)
    return (m * (w @ norms)).reshape(vectors[0].shape)


# ---------------------------------------------------------------- written-out examples


def vec(*xs):
    return {"w": f32(xs)}


def test_ties_written_out():
    base, m1, m2 = vec(0, 0, 0, 0), vec(1, -2, 0.5, 0), vec(-3, 1, 0.5, 2)
    ties = merges.get("ties")
    # Signs [-, -, +, +] elected from the sums [-2, -1, 1, 2]; zero entries never vote.
    check(ties([m1, m2], base=base, density=1.0), [[-3, -2, 0.5, 2]])
    # Trimmed to two entries each: [1, -2, 0, 0] and [-3, 0, 0, 2]; entry 2 nobody kept.
    check(ties([m1, m2], base=base, density=0.5), [[-3, -2, 0, 2]])
    small, big = vec(1, 1), vec(-5, -5)
    zero = vec(0, 0)
    check(ties([small, small, big], base=zero, density=1.0), [[-5, -5]])
    check(ties([small, small, big], base=zero, density=1.0, sign_method="count"), [[1, 1]])


def test_stitch_written_out():
    models = [vec(4, 1, 0, -3), vec(2, -5, 1, 0)]
    out = merges.get("stitch")(models, base=vec(0, 0, 0, 0), density=0.5)
    # Masks {0, 3} and {0, 1}: entry 0 is shared and averaged, entry 2 is nobody's.
    check(out, [[3, -5, 0, -3]])


def test_breadcrumbs_written_out():
    delta = vec(10, 5, 4, 3, 2, 1, 0.5, 0.1, -0.2, 0.05)
    zero = jax.tree.map(jnp.zeros_like, delta)
    out = merges.get("breadcrumbs")([delta], base=zero, density=0.3, gamma=0.1)
    # The top 10% (the outlier 10) goes, the next 30% stays, the small tail goes.
    check(out, [[0, 5, 4, 3, 0, 0, 0, 0, 0, 0]])


def test_model_stock_written_out():
    ms = merges.get("model_stock")
    zero = vec(0, 0)
    check(ms([vec(1, 0), vec(0, 1)], base=zero), [[0, 0]])  # orthogonal: t = 0, the base
    # cos = 1/sqrt(2): t = 2c / (1 + c) = 2 (sqrt(2) - 1); average (1, 0.5).
    t = 2 * (math.sqrt(2) - 1)
    check(ms([vec(1, 0), vec(1, 1)], base=zero), [[t, t / 2]])
    # Opposed task vectors (cos < 0) clip to t = 0 rather than extrapolating past the base.
    check(ms([vec(1, 0), vec(-1, 0.5)], base=zero), [[0, 0]])


def test_consensus_written_out():
    d1, d2, d3 = vec(1, 1, 0, 2), vec(1, -1, 3, 0), vec(1, 0, 0, 1)
    # tau = (3, 0, 3, 3); TALL masks with lambda 0.5: (1,1,0,1), (1,1,1,0), (1,1,0,1);
    # votes (3, 3, 1, 2) >= 2 keep entries 0, 1, 3; entry 2 is task 2's alone.
    out = merges.get("consensus")([d1, d2, d3], base=vec(0, 0, 0, 0), tall_lambda=0.5, scale=0.5)
    check(out, [[1.5, 0, 0, 1.5]])


def test_sphere_means_written_out():
    a, b = vec(2, 0, 0), vec(0, 2, 0)
    # Karcher with weights (3/4, 1/4) between equal norms is SLERP at t = 1/4 of a right angle.
    angle = math.pi / 8
    check(merges.get("karcher")([a, b], weights=[0.75, 0.25], tol=0.0, max_iter=50),
          [[2 * math.cos(angle), 2 * math.sin(angle), 0]])
    # Multi-SLERP normalises the weighted sum (0.75, 0.25) instead.
    r = 2 / math.hypot(0.75, 0.25)
    check(merges.get("multislerp")([a, b], weights=[0.75, 0.25]), [[0.75 * r, 0.25 * r, 0]])


# ---------------------------------------------------------------- random inputs vs references


def test_task_arithmetic_matches_reference_with_per_leaf_scale():
    models, base = fine_tunes()
    scale = {"a": 0.3, "b": [1.0], "c": -0.5}
    out = merges.get("task_arithmetic")(models, base=base, weights=[1.0, 2.0, -1.0], scale=scale)
    b, deltas = task_deltas(models, base)
    scales = [0.3, 1.0, -0.5]
    check(out, [bj + s * (d[0] + 2 * d[1] - d[2]) for bj, d, s in zip(b, deltas, scales)])


@pytest.mark.parametrize("scope", ["leaf", "global"])
@pytest.mark.parametrize("sign_method", ["sum", "count"])
def test_ties_matches_reference(scope, sign_method):
    models, base = fine_tunes()
    w = [1.0, 0.5, 2.0]
    out = merges.get("ties")(models, base=base, weights=w, density=0.3, scale=0.8,
                             scope=scope, sign_method=sign_method)
    b, deltas = task_deltas(models, base)
    trimmed = trim_ref(deltas, 0.3, scope)
    check(out, [bj + 0.8 * ties_combine_ref(t, w, sign_method) for bj, t in zip(b, trimmed)])


def test_ties_per_leaf_density_matches_reference_leaf_by_leaf():
    models, base = fine_tunes()
    out = merges.get("ties")(models, base=base, density={"a": 0.1, "b": [0.5], "c": 1.0})
    b, deltas = task_deltas(models, base)
    expected = [bj + ties_combine_ref(trim_ref([d], dens, "leaf")[0], [1, 1, 1])
                for bj, d, dens in zip(b, deltas, [0.1, 0.5, 1.0])]
    check(out, expected)


def test_global_and_leaf_scope_differ_when_one_leaf_dominates():
    models, base = fine_tunes(2)
    # Huge updates in "a".
    models = [{**m, "a": m["a"] + 10.0 * (i + 1)} for i, m in enumerate(models)]
    ties = merges.get("ties")
    glob = ties(models, base=base, density=0.3, scope="global")
    # Globally, the top 30% (15 of 49 entries) all lie in "a", so "b" and "c" stay at base.
    check({"b": glob["b"], "c": glob["c"]}, as64({"b": base["b"], "c": base["c"]}), atol=0)
    leaf = ties(models, base=base, density=0.3, scope="leaf")
    assert not np.allclose(leaf["c"], base["c"])


def test_global_scope_rejects_per_leaf_density():
    models, base = fine_tunes()
    with pytest.raises(ValueError, match="global"):
        density = {"a": 0.1, "b": [0.5], "c": 1.0}
        merges.get("ties")(models, base=base, density=density, scope="global")


@pytest.mark.parametrize("combine", ["linear", "ties"])
def test_breadcrumbs_matches_reference(combine):
    models, base = fine_tunes()
    out = merges.get("breadcrumbs")(
        models, base=base, density=0.4, gamma=0.1, combine=combine, scale=0.7
    )
    b, deltas = task_deltas(models, base)
    expected = []
    for bj, d in zip(b, deltas):
        kept = []
        for x in d:
            band = top_mask(np.abs(x), keep(x.size, 0.5)) & ~top_mask(np.abs(x), keep(x.size, 0.1))
            kept.append(np.where(band, x, 0))
        merged = sum(kept) if combine == "linear" else ties_combine_ref(kept, [1, 1, 1])
        expected.append(bj + 0.7 * merged)
    check(out, expected)


@pytest.mark.parametrize("combine", ["linear", "ties"])
@pytest.mark.parametrize("density", [0.2, 1.0])
def test_stitch_and_consensus_match_reference(combine, density):
    models, base = fine_tunes()
    b, deltas = task_deltas(models, base)
    w = [1.0, 2.0, 0.5]
    out = merges.get("stitch")(models, base=base, weights=w, density=density)
    trimmed = trim_ref(deltas, density, "leaf")
    expected = []
    for bj, t in zip(b, trimmed):
        cover = [wi * (x != 0) for wi, x in zip(w, t)]
        total = sum(cover)
        num = sum(c * x for c, x in zip(cover, t))
        expected.append(bj + np.where(total > 0, num / np.where(total > 0, total, 1), 0))
    check(out, expected)

    out = merges.get("consensus")(models, base=base, weights=w, combine=combine, density=density,
                                  tall_lambda=0.4, min_agreement=2, scale=0.5)
    expected = []
    for bj, d, t in zip(b, deltas, trim_ref(deltas, density, "leaf")):
        tau = sum(wi * x for wi, x in zip(w, d)) if combine == "linear" else ties_combine_ref(t, w)
        votes = sum((np.abs(x) >= 0.4 * np.abs(tau - x)).astype(int) for x in d)
        expected.append(bj + 0.5 * np.where(votes >= 2, tau, 0))
    check(out, expected)


def test_model_stock_matches_reference():
    models, base = fine_tunes(4)
    out = merges.get("model_stock")(models, base=base)
    b, deltas = task_deltas(models, base)
    expected = []
    for bj, d in zip(b, deltas):
        flat = [x.ravel() for x in d]
        cos = np.mean([flat[i] @ flat[j] / np.linalg.norm(flat[i]) / np.linalg.norm(flat[j])
                       for i in range(4) for j in range(i + 1, 4)])
        cos = min(max(cos, 0.0), 1.0)
        t = 4 * cos / (1 + 3 * cos)
        expected.append(t * (bj + sum(d) / 4) + (1 - t) * bj)
    check(out, expected)


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_and_karcher_match_reference(with_base):
    models, base = fine_tunes()
    w = [0.2, 0.5, 0.3]
    b64, per_model = as64(base), [as64(m) for m in models]
    origin = b64 if with_base else [0.0] * len(b64)
    kwargs = {"base": base} if with_base else {}
    for name, iters in [("multislerp", 0), ("karcher", 200)]:
        extra = {"max_iter": 50, "tol": 0.0} if name == "karcher" else {}
        out = merges.get(name)(models, weights=w, **kwargs, **extra)
        expected = [sphere_ref([pm[j] - origin[j] for pm in per_model], w, iters) + origin[j]
                    for j in range(len(b64))]
        check(out, expected, rtol=2e-5)


def test_karcher_mean_satisfies_first_order_condition():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 30)) + 2.0  # within a hemisphere: the mean is unique
    w = np.array([0.1, 0.2, 0.3, 0.4])
    models = [{"v": f32(r)} for r in x]
    out = merges.get("karcher")(models, weights=list(w), tol=1e-7, max_iter=100)
    out = np.asarray(out["v"], np.float64)
    m = out / np.linalg.norm(out)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    # The Riemannian gradient sum_i w_i log_m(u_i) vanishes at the Karcher mean.
    grad = np.zeros_like(m)
    for wi, ui in zip(w, u):
        c = ui @ m
        grad += wi * np.arccos(np.clip(c, -1, 1)) / np.sqrt(1 - c**2) * (ui - c * m)
    assert np.linalg.norm(grad) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(out), w @ np.linalg.norm(x, axis=1), rtol=1e-5)


# ---------------------------------------------------------------- DARE


def test_dare_drops_at_the_rate_and_rescales_by_the_inverse():
    base = {"w": jnp.zeros((100, 100))}
    delta = {"w": f32(np.random.default_rng(1).normal(size=(100, 100)))}
    out = np.asarray(merges.get("dare")([delta], base=base, drop_rate=0.3, seed=7)["w"], np.float64)
    kept = out != 0
    assert abs(kept.mean() - 0.7) < 0.02
    np.testing.assert_allclose(out[kept], np.asarray(delta["w"], np.float64)[kept] / 0.7, rtol=1e-6)


def test_dare_norm_rescaling_keeps_each_leafs_norm():
    models, base = fine_tunes(2)
    out = merges.get("dare")(models[:1], base=base, drop_rate=0.6, rescale="norm", seed=1)
    b, deltas = task_deltas(models[:1], base)
    for got, bj, d in zip(as64(out), b, deltas):
        np.testing.assert_allclose(np.linalg.norm(got - bj), np.linalg.norm(d[0]), rtol=1e-5)


def test_dare_masks_differ_across_leaves_and_models():
    same = f32(np.ones(64))
    models = [{"x": same, "y": same}, {"x": same, "y": same}]
    base = {"x": jnp.zeros(64), "y": jnp.zeros(64)}
    inputs = _task_vectors.flat_inputs(models, base, operator="dare")
    stacks = dare.dropped_task_vectors(inputs, [0.5, 0.5], "none", seed=0)
    x, y = (np.asarray(s) != 0 for s in stacks)
    assert not np.array_equal(x[0], y[0]) and not np.array_equal(x[0], x[1])


@pytest.mark.parametrize("combine", ["linear", "ties"])
def test_dare_combines_the_dropped_vectors_like_the_reference(combine):
    models, base = fine_tunes()
    w = [1.0, 0.5, 2.0]
    out = merges.get("dare")(
        models, base=base, weights=w, drop_rate=0.5, combine=combine, seed=4, scale=0.9
    )
    inputs = _task_vectors.flat_inputs(models, base, operator="dare")
    dropped = dare.dropped_task_vectors(inputs, [0.5] * 3, "inverse", seed=4)
    b, deltas = task_deltas(models, base)
    expected = []
    for bj, d, st in zip(b, deltas, dropped):
        # The realised mask, applied to the float64 task vectors.
        kept = [np.where(np.asarray(s) != 0, x / 0.5, 0) for s, x in zip(st, d)]
        if combine == "linear":
            merged = sum(wi * k for wi, k in zip(w, kept))
        else:
            merged = ties_combine_ref(kept, w)
        expected.append(bj + 0.9 * merged)
    check(out, expected)


def test_dare_with_everything_dropped_returns_base():
    models, base = fine_tunes()
    check(merges.get("dare")(models, base=base, drop_rate=1.0), as64(base), atol=0)


# ---------------------------------------------------------------- sphere options shared with slerp


@pytest.mark.parametrize("name, iters", [("multislerp", 0), ("karcher", 200)])
def test_sphere_means_per_row_and_under_a_mask(name, iters):
    models, base = fine_tunes()
    w = [0.2, 0.5, 0.3]
    extra = {"max_iter": 50, "tol": 0.0} if name == "karcher" else {}
    per_model = [as64(m) for m in models]
    out = merges.get(name)(models, weights=w, granularity="row", **extra)
    expected = []
    for j, leaf in enumerate(per_model[0]):
        if leaf.ndim < 2:
            expected.append(sphere_ref([pm[j] for pm in per_model], w, iters))
        else:
            rows = [sphere_ref([pm[j][r] for pm in per_model], w, iters) for r in range(leaf.shape[0])]
            expected.append(np.stack(rows))
    check(out, expected, rtol=2e-5)

    rng = np.random.default_rng(3)
    mask = jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape) < 0.5), base)
    out = merges.get(name)(models, weights=w, mask=mask, **extra)
    expected = []
    for j, (m, first) in enumerate(zip(jax.tree.leaves(mask), per_model[0])):
        m = np.asarray(m)
        merged = sphere_ref([pm[j][m] for pm in per_model], w, iters)
        expected.append(np.where(m, 0.0, first))
        expected[-1][m] = merged
    check(out, expected, rtol=2e-5)


def test_sphere_mask_must_match_the_models():
    models, base = fine_tunes()
    bad = {"a": jnp.ones((6, 4), bool), "b": [jnp.ones(5, bool)], "c": jnp.ones((4, 5))}
    with pytest.raises(ValueError, match="leaf 'c': mask has dtype float32, expected bool"):
        merges.get("multislerp")(models, mask=bad)
