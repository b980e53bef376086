"""Tests for cpift_jax.merges.slerp: literal values, properties against a float64 reference,
masks, dtypes, the multi-model fold, row granularity and bad input."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cpift_jax import merges, row_blocks, sphere
from cpift_jax.merges import slerp as slerp_lib
from merge_trees import ref_fold, ref_slerp

SETTINGS = settings(max_examples=30, deadline=None)
R2 = math.sqrt(0.5)


# --------------------------------------------------------------------- float64 references


def ref_cos(a, b, mask=None, eps=1e-8):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None:
        a, b = a[np.asarray(mask)], b[np.asarray(mask)]
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(np.sum((a / na if na > eps else a) * (b / nb if nb > eps else b))), na, nb


def away_from_edges(a, b, mask=None):
    """Skips inputs within float32 rounding of a branch edge (|cos| = 0.9995, norm = eps):
    there float32 and float64 may legitimately take different branches."""
    cos, na, nb = ref_cos(a, b, mask)
    assume(abs(abs(cos) - 0.9995) > 1e-4)
    assume(all(n == 0 or abs(n - 1e-8) > 1e-9 for n in (na, nb)))


def close(actual, expected, scale=1.0, rtol=2e-4):
    """Equal up to float32 rounding, measured against the size of the inputs and of the result.

    Near-antiparallel inputs (sin(theta) down to sin(acos(0.9995)) ~ 0.03) give coefficients
    up to ~30 and an arccos that is sensitive to the cosine's last bit, so float32 results
    may differ from float64 by ~1e-4 of their magnitude; wrong formulas differ by far more.
    """
    expected = np.asarray(expected, np.float64)
    size = max(scale, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=rtol * size)


# ------------------------------------------------------------------------------- literals


@pytest.mark.parametrize(
    "a, b, t, expected",
    [
        # orthogonal unit vectors, halfway: both coefficients sin(pi/4) / sin(pi/2)
        ([1.0, 0.0], [0.0, 1.0], 0.5, [R2, R2]),
        # orthogonal, t = 1/3: sin(pi/3) and sin(pi/6)
        ([1.0, 0.0], [0.0, 1.0], 1 / 3, [math.sqrt(3) / 2, 0.5]),
        # 60 degrees apart, halfway: the unit vector at 30 degrees
        ([1.0, 0.0], [0.5, math.sqrt(3) / 2], 0.5, [math.sqrt(3) / 2, 0.5]),
        # the angle is that of the normalised copies, the mix is of the originals (norm 2 and 1)
        ([2.0, 0.0], [0.0, 1.0], 0.5, [2 * R2, R2]),
        # parallel (cos = 1): linear interpolation
        ([1.0, 2.0], [2.0, 4.0], 0.25, [1.25, 2.5]),
        # antiparallel (cos = -1): linear, through zero
        ([1.0, 2.0], [-1.0, -2.0], 0.5, [0.0, 0.0]),
        # a zero vector is not normalised, so it counts as orthogonal
        ([0.0, 0.0], [3.0, 4.0], 0.5, [3 * R2, 4 * R2]),
        # two zero vectors give zero
        ([0.0, 0.0], [0.0, 0.0], 0.5, [0.0, 0.0]),
        # the cosine is over the whole leaf (Frobenius): [[1,0],[0,0]] vs [[0,0],[0,1]]
        ([[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]], 0.5, [[R2, 0.0], [0.0, R2]]),
    ],
)
def test_slerp_literal(a, b, t, expected):
    out = slerp_lib.slerp(jnp.array(a), jnp.array(b), t)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_slerp_coefficients_literal():
    # <a,a> = 1, <b,b> = 4, <a,b> = 0: orthogonal; t = 0.5 -> both sin(pi/4)
    c_a, c_b = sphere.slerp_coefficients(1.0, 4.0, 0.0, 0.5)
    np.testing.assert_allclose([c_a, c_b], [R2, R2], rtol=1e-6)
    # |cos| = 0.9996 > 0.9995 -> linear
    c_a, c_b = sphere.slerp_coefficients(1.0, 1.0, 0.9996, 0.3)
    np.testing.assert_allclose([c_a, c_b], [0.7, 0.3], rtol=1e-6)
    # cos = 0.999 <= 0.9995 -> spherical: sin(0.7 theta) / sin(theta) etc.
    theta = math.acos(0.999)
    c_a, c_b = sphere.slerp_coefficients(1.0, 1.0, 0.999, 0.3)
    np.testing.assert_allclose(
        [c_a, c_b], [math.sin(0.7 * theta) / math.sin(theta), math.sin(0.3 * theta) / math.sin(theta)],
        rtol=1e-4,
    )


def test_slerp_mask_literal():
    a, b = jnp.array([1.0, 0.0, 5.0]), jnp.array([0.0, 1.0, 7.0])
    out = slerp_lib.slerp(a, b, 0.5, jnp.array([True, True, False]))
    # the 5 and 7 take no part in the angle: [1, 0] vs [0, 1] is orthogonal
    np.testing.assert_allclose(out, [R2, R2, 5.0], rtol=1e-6)


def test_row_granularity_literal():
    a = jnp.array([[1.0, 0.0], [1.0, 2.0]])
    b = jnp.array([[0.0, 1.0], [2.0, 4.0]])
    rows = slerp_lib.slerp(a, b, 0.5, granularity="row")
    np.testing.assert_allclose(rows, [[R2, R2], [1.5, 3.0]], rtol=1e-6)  # row 1 is parallel
    whole = slerp_lib.slerp(a, b, 0.5)  # one cosine for the whole leaf: 10 / sqrt(6 * 21)
    np.testing.assert_allclose(whole, ref_slerp(a, b, 0.5), rtol=1e-6)
    assert not np.allclose(rows, whole)
    # 1-D leaves fall back to the whole leaf
    v, w = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
    np.testing.assert_array_equal(slerp_lib.slerp(v, w, 0.5, granularity="row"), slerp_lib.slerp(v, w, 0.5))


def test_merge_literal_two_and_three_models():
    m = [{"w": jnp.array([1.0, 0.0, 0.0])}, {"w": jnp.array([0.0, 1.0, 0.0])}, {"w": jnp.array([0.0, 0.0, 1.0])}]
    two = merges.get("slerp")(m[:2])
    np.testing.assert_allclose(two["w"], [R2, R2, 0.0], rtol=1e-6)
    # fold, t_3 = 1/3: acc_2 = [r, r, 0] is orthogonal to e3 with norm 1 -> sin(pi/3), sin(pi/6)
    three = merges.get("slerp")(m)
    c = math.sqrt(3) / 2
    np.testing.assert_allclose(three["w"], [c * R2, c * R2, 0.5], rtol=1e-6)


# --------------------------------------------------------------------------- properties

# No subnormals: XLA on CPU flushes float32 subnormals to zero, so 1e-45 comes back as 0.
_ELEMENTS = st.floats(-4, 4, width=32, allow_subnormal=False) | st.sampled_from([0.0, 1.0, -1.0])
_T = st.floats(0, 1) | st.sampled_from([0.0, 0.5, 1.0])


@st.composite
def pairs(draw, shape=st.sampled_from([(1,), (3,), (7,), (2, 3), (4, 5)])):
    shape = draw(shape)
    a = draw(hnp.arrays(np.float32, shape, elements=_ELEMENTS))
    b = draw(hnp.arrays(np.float32, shape, elements=_ELEMENTS))
    return a, b


@SETTINGS
@given(ab=pairs())
def test_endpoints_are_exact(ab):
    a, b = ab
    np.testing.assert_array_equal(slerp_lib.slerp(a, b, 0.0), a)
    np.testing.assert_array_equal(slerp_lib.slerp(a, b, 1.0), b)


@SETTINGS
@given(
    a=hnp.arrays(np.float32, st.sampled_from([(4,), (3, 3)]), elements=_ELEMENTS),
    scale=st.floats(0.1, 3) | st.floats(-3, -0.1),
    t=_T,
)
def test_colinear_inputs_interpolate_linearly(a, scale, t):
    assume(np.linalg.norm(a) > 1e-3)
    b = (a * np.float32(scale)).astype(np.float32)
    cos, _, _ = ref_cos(a, b)
    assert abs(cos) > 0.9995
    expected = (1 - t) * a.astype(np.float64) + t * b.astype(np.float64)
    close(slerp_lib.slerp(a, b, t), expected, scale=np.abs(a).max() * 3)


@SETTINGS
@given(ab=pairs(), t=_T)
def test_symmetric_in_the_models(ab, t):
    a, b = ab
    away_from_edges(a, b)
    scale = max(np.abs(a).max(), np.abs(b).max(), 1.0)
    forward = np.asarray(slerp_lib.slerp(a, b, t), np.float64)
    close(slerp_lib.slerp(b, a, 1.0 - t), forward, scale=scale)


@SETTINGS
@given(ab=pairs(), t=_T)
def test_unit_inputs_stay_unit(ab, t):
    a, b = ab
    na, nb = np.linalg.norm(a.astype(np.float64)), np.linalg.norm(b.astype(np.float64))
    assume(na > 1e-3 and nb > 1e-3)
    a, b = (a / na).astype(np.float32), (b / nb).astype(np.float32)
    cos, _, _ = ref_cos(a, b)
    assume(cos > -0.9995)  # antiparallel inputs interpolate linearly through zero
    norm = np.linalg.norm(np.asarray(slerp_lib.slerp(a, b, t), np.float64))
    # The linear fallback for nearly parallel inputs shrinks the norm by at most
    # t (1 - t) (1 - cos) <= 0.25 * 0.0005.
    tol = 1e-5 if cos <= 0.9995 else 1.3e-4
    assert abs(norm - 1.0) <= tol


@SETTINGS
@given(ab=pairs(), t=_T)
def test_matches_float64_reference(ab, t):
    a, b = ab
    away_from_edges(a, b)
    scale = max(np.abs(a).max(), np.abs(b).max(), 1e-6)
    close(slerp_lib.slerp(a, b, t), ref_slerp(a, b, t), scale=scale)


@SETTINGS
@given(ab=pairs(), t=_T, data=st.data())
def test_mask_keeps_a_and_uses_only_selected_entries(ab, t, data):
    a, b = ab
    mask = data.draw(hnp.arrays(np.bool_, a.shape))
    away_from_edges(a, b, mask)
    out = np.asarray(slerp_lib.slerp(a, b, t, jnp.asarray(mask)))
    np.testing.assert_array_equal(out[~mask], a[~mask])  # bit-exact
    scale = max(np.abs(a).max(), np.abs(b).max(), 1e-6)
    close(out, ref_slerp(a, b, t, mask), scale=scale)
    if mask.any():  # the selected entries are SLERP of the selected entries alone
        alone = slerp_lib.slerp(a[mask], b[mask], t)
        close(out[mask], np.asarray(alone, np.float64), scale=scale)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_in_same_dtype_out_math_in_float32(dtype):
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((4, 6)), dtype)
    b = jnp.asarray(rng.standard_normal((4, 6)), dtype)
    out = slerp_lib.slerp(a, b, 0.3)
    assert out.dtype == dtype
    expected = slerp_lib.slerp(a.astype(jnp.float32), b.astype(jnp.float32), 0.3).astype(dtype)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
    merged = merges.get("slerp")([{"w": a}, {"w": b}, {"w": a * 2}])["w"]
    assert merged.dtype == dtype
    # the fold stays in float32: one rounding to the dtype at the end
    ref = ref_fold([np.asarray(x, np.float32) for x in (a, b, a * 2)], [0.5, 1 / 3])
    np.testing.assert_allclose(np.asarray(merged, np.float32), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.slow  # each model count compiles its own fold
@SETTINGS
@given(
    models=st.integers(2, 5).flatmap(
        lambda n: st.lists(hnp.arrays(np.float32, (2, 4), elements=_ELEMENTS),
                           min_size=n, max_size=n)
    )
)
def test_fold_matches_numpy_fold(models):
    n = len(models)
    ts = [1.0 / i for i in range(2, n + 1)]
    # a fold step close to a branch edge may legitimately differ; skip such inputs
    acc = np.asarray(models[0], np.float64)
    for m, t in zip(models[1:], ts):
        away_from_edges(acc, m)
        acc = ref_slerp(acc, m, t)
    out = merges.get("slerp")([{"w": m} for m in models])["w"]
    scale = max(float(np.abs(m).max()) for m in models) + 1e-6
    close(out, ref_fold(models, ts), scale=scale, rtol=1e-3)  # each step can amplify rounding
    # the one-pass coefficients used by fusion give the same fold
    flat = np.stack([m.reshape(-1).astype(np.float64) for m in models])
    coeffs = np.asarray(sphere.fold_coefficients(flat @ flat.T, jnp.asarray(ts)), np.float64)
    close((coeffs @ flat).reshape(2, 4), ref_fold(models, ts), scale=scale, rtol=1e-3)


def test_fold_weights_and_equal_shares():
    assert sphere.fold_ts(4) == [1 / 2, 1 / 3, 1 / 4]
    assert sphere.fold_ts(3, [1.0, 1.0, 2.0]) == [0.5, 0.5]
    assert sphere.fold_ts(3, [0.0, 0.0, 1.0]) == [0.0, 1.0]
    # colinear models: the fold is exactly the equal-weight mean
    models = [{"w": jnp.array([1.0, 2.0]) * s} for s in (1.0, 2.0, 3.0, 6.0)]
    np.testing.assert_allclose(merges.get("slerp")(models)["w"], [3.0, 6.0], rtol=1e-6)
    weighted = merges.get("slerp")(models[:3], weights=[1.0, 1.0, 2.0])["w"]
    np.testing.assert_allclose(weighted, [2.25, 4.5], rtol=1e-6)  # (1 + 2 + 2 * 3) / 4


def test_single_model_and_per_leaf_t():
    one = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
    out = merges.get("slerp")([one])
    np.testing.assert_array_equal(out["a"], one["a"])
    m0 = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([1.0, 0.0])}
    m1 = {"a": jnp.array([0.0, 1.0]), "b": jnp.array([0.0, 1.0])}
    out = merges.get("slerp")([m0, m1], t={"a": 0.0, "b": 1.0})
    np.testing.assert_array_equal(out["a"], m0["a"])
    np.testing.assert_array_equal(out["b"], m1["b"])


@SETTINGS
@given(ab=pairs(st.sampled_from([(3, 4), (2, 2, 5)])), t=_T)
def test_row_granularity_is_slerp_per_row(ab, t):
    a, b = ab
    out = np.asarray(slerp_lib.slerp(a, b, t, granularity="row"))
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    for r, (x, y) in enumerate(zip(a2, b2)):
        away_from_edges(x, y)
        scale = max(np.abs(x).max(), np.abs(y).max(), 1e-6)
        close(out.reshape(a2.shape)[r], ref_slerp(x, y, t), scale=scale)
    merged = merges.get("slerp")([{"w": a}, {"w": b}], t=t, granularity="row")["w"]
    np.testing.assert_allclose(merged, out, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # leaves past the row-block threshold (1M entries)
@pytest.mark.parametrize("n, granularity", [(2, "leaf"), (3, "row")])
def test_big_host_leaves_equal_the_jitted_definition(n, granularity):
    """Eager leaves of at least ``row_blocks.BLOCK_MIN_ENTRIES`` entries take the host path
    (pass 1 in parallel row blocks on a multi-core host); under ``jit`` the operator inlines
    the one-program definition. Both agree to float32 rounding, with and without a mask, and
    the leaf SLERP matches the float64 reference."""
    rng = np.random.default_rng(n)
    shapes = {"mat": (1024, 1024), "stack": (2, 512, 1024), "vec": (1 << 20,), "small": (8, 16)}
    big = [k for k, s in shapes.items() if math.prod(s) >= row_blocks.BLOCK_MIN_ENTRIES]
    assert big == ["mat", "stack", "vec"]
    common = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    models = [{k: jnp.asarray(c + rng.standard_normal(c.shape).astype(np.float32))
               for k, c in common.items()} for _ in range(n)]
    mask = {k: jnp.asarray(rng.random(s) < 0.6) for k, s in shapes.items()}
    merge = merges.get("slerp")
    for m in (None, mask):
        eager = merge(models, mask=m, granularity=granularity)
        jitted = jax.jit(lambda ms, m: merge(ms, mask=m, granularity=granularity))(models, m)
        for k in shapes:
            np.testing.assert_allclose(eager[k], jitted[k], rtol=1e-5, atol=1e-5, err_msg=k)
    if n == 2 and granularity == "leaf":
        for k in shapes:
            close(eager[k], ref_slerp(models[0][k], models[1][k], 0.5, mask=mask[k]), scale=3.0)
    donated = merge([jax.tree.map(jnp.copy, models[0])] + models[1:], mask=mask,
                    granularity=granularity, donate=True)
    for k in shapes:
        np.testing.assert_array_equal(donated[k], eager[k], err_msg=k)


# ----------------------------------------------------------------------------- bad input


def _pair():
    return ({"x": jnp.zeros(3), "y": {"w": jnp.ones((2, 2))}},
            {"x": jnp.ones(3), "y": {"w": jnp.zeros((2, 2))}})


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda a, b: [], {}, "need at least 1 model"),
        (lambda a, b: [a, {"x": b["x"]}], {}, "leaf 'y/w' is in models\\[0\\] but missing from models\\[1\\]"),
        (lambda a, b: [a, {"x": b["x"], "y": {"w": jnp.zeros(4)}}], {}, "leaf 'y/w': models\\[0\\] has shape"),
        (lambda a, b: [a, {"x": b["x"].astype(jnp.bfloat16), "y": b["y"]}], {},
         "leaf 'x': models\\[0\\] has dtype float32, models\\[1\\] has dtype bfloat16"),
        (lambda a, b: [a, b], dict(mask={"x": jnp.ones(3, bool), "y": {"w": jnp.ones(4, bool)}}),
         "leaf 'y/w': models\\[0\\] has shape \\(2, 2\\), mask has shape \\(4,\\)"),
        (lambda a, b: [a, b], dict(mask={"x": jnp.ones(3), "y": {"w": jnp.ones((2, 2), bool)}}),
         "leaf 'x': mask has dtype float32, expected bool"),
        (lambda a, b: [a, b], dict(t=1.5), "t for leaf 'x' must be in \\[0, 1\\]"),
        (lambda a, b: [a, b], dict(t={"x": 0.5, "y": {"w": -0.1}}), "t for leaf 'y/w' must be in"),
        (lambda a, b: [a, b, a], dict(t=0.3), "applies only to two models"),
        (lambda a, b: [a, b], dict(weights=[1.0]), "weights has 1 entries for 2 models"),
        (lambda a, b: [a, b], dict(weights=[1.0, -1.0]), "weights must be >= 0"),
        (lambda a, b: [a, b], dict(granularity="column"), "granularity must be one of"),
    ],
)
def test_merge_bad_input(make, kwargs, match):
    a, b = _pair()
    with pytest.raises(ValueError, match=match):
        merges.get("slerp")(make(a, b), **kwargs)


def test_merge_rejects_a_dict_of_models():
    a, b = _pair()
    with pytest.raises(TypeError, match="models must be a list"):
        merges.get("slerp")({"a": a, "b": b})


def test_leaf_slerp_bad_input():
    a, b = jnp.zeros(3), jnp.ones(3)
    with pytest.raises(ValueError, match="same-shape"):
        slerp_lib.slerp(a, jnp.ones(4), 0.5)
    with pytest.raises(ValueError, match=r"mask must be a bool array of shape \(3,\)"):
        slerp_lib.slerp(a, b, 0.5, jnp.ones(4, bool))
    with pytest.raises(ValueError, match=r"mask must be a bool array"):
        slerp_lib.slerp(a, b, 0.5, jnp.ones(3))
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        slerp_lib.slerp(a, b, -0.5)
    with pytest.raises(ValueError, match="granularity"):
        slerp_lib.slerp(a, b, 0.5, granularity="rows")
