"""Tests for cpift_jax.fusion: overlap rules, report counts, the non-core SLERP merge, other
operators, the host kernel equal to the definition, the 1-D mesh path, donation and bad input."""

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh

from cpift_jax import fusion, fusion_kernel, merges

R2 = math.sqrt(0.5)
T, F = True, False


def literal_case():
    """Two task models over leaves w (2, 3) and v (4,) with hand-computed fusions.

    w: core entries (0,0) task 0 only, (0,2) task 1 only, (1,0) both (|5| > |-4|). Non-core
       entries (0,1), (1,1), (1,2): task 0 = [2, 0, 0], task 1 = [0, 0, 1], orthogonal, so
       SLERP at t = 1/2 gives sin(pi/4) * (a + b) = [2 r, 0, r] with r = sqrt(1/2).
    v: entry 0 in both cores (|-3| beats |1|), entry 3 in both with tied |delta| = 1;
       non-core entries 1, 2 are equal in both tasks (parallel: linear, unchanged).
    """
    backbone = {"v": jnp.array([1.0, 1.0, 1.0, 0.0]), "w": jnp.zeros((2, 3))}
    tuned = [
        {"v": jnp.array([2.0, 1.0, 3.0, 1.0]), "w": jnp.array([[1.0, 2.0, 0.0], [5.0, 0.0, 0.0]])},
        {"v": jnp.array([-2.0, 1.0, 3.0, -1.0]), "w": jnp.array([[0.0, 0.0, 3.0], [-4.0, 0.0, 1.0]])},
    ]
    cores = [
        {"v": jnp.array([T, F, F, T]), "w": jnp.array([[T, F, F], [T, F, F]])},
        {"v": jnp.array([T, F, F, T]), "w": jnp.array([[F, F, T], [T, F, F]])},
    ]
    return backbone, tuned, cores


EXPECTED = {
    "max_delta": ({"v": [-2.0, 1.0, 3.0, 1.0], "w": [[1.0, 2 * R2, 3.0], [5.0, 0.0, R2]]}, [3, 2]),
    "mean": ({"v": [0.0, 1.0, 3.0, 0.0], "w": [[1.0, 2 * R2, 3.0], [0.5, 0.0, R2]]}, [4, 4]),
    "first": ({"v": [2.0, 1.0, 3.0, 1.0], "w": [[1.0, 2 * R2, 3.0], [5.0, 0.0, R2]]}, [4, 1]),
}


def assert_tree_close(actual, expected, rtol=1e-6, atol=1e-6):
    as_leaf = lambda x: isinstance(x, list)  # noqa: E731  (written-out nested lists are leaves)
    actual, expected = jax.tree.leaves(actual), jax.tree.leaves(expected, is_leaf=as_leaf)
    assert len(actual) == len(expected)
    for x, y in zip(actual, expected):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("rule", sorted(EXPECTED))
def test_literal_fusion_and_report(rule):
    backbone, tuned, cores = literal_case()
    fused, report = fusion.fuse(backbone, tuned, cores, overlap=rule)
    expected, transplanted = EXPECTED[rule]
    assert_tree_close(fused, expected)
    assert report == {
        "num_tasks": 2,
        "merge": "slerp",
        "overlap_rule": rule,
        "total_params": 10,
        "core_union": 5,
        "merged_entries": 5,
        "core_sizes": [4, 4],
        "transplanted": transplanted,
        "overlap_entries": 3,
        "pairwise_overlap": [[4, 3], [3, 4]],
    }


def test_literal_linear_operator():
    backbone, tuned, cores = literal_case()
    fused, report = fusion.fuse(backbone, tuned, cores, merge="linear")
    # non-core entries: plain means; core entries as for max_delta
    assert_tree_close(fused, {"v": [-2.0, 1.0, 3.0, 1.0], "w": [[1.0, 1.0, 3.0], [5.0, 0.0, 0.5]]})
    assert report["merge"] == "linear" and report["transplanted"] == [3, 2]
    fused, _ = fusion.fuse(backbone, tuned, cores, merge="linear", weights=[3.0, 1.0])
    np.testing.assert_allclose(fused["w"], [[1.0, 1.5, 3.0], [5.0, 0.0, 0.25]])


def test_three_tasks_literal():
    # One leaf; entry 0 in all three cores (task 2 moved most), entry 1 in tasks 0 and 1
    # (task 1 moved most), entry 2 in task 2 only; entries 3, 4 in no core, colinear in all
    # three tasks, so the fold (t_2 = 1/2, t_3 = 1/3) is the mean [2, 4].
    backbone = {"x": jnp.zeros(5)}
    tuned = [{"x": jnp.array([1.0, 1.0, 7.0, 1.0, 2.0])},
             {"x": jnp.array([2.0, -3.0, 7.0, 2.0, 4.0])},
             {"x": jnp.array([-5.0, 0.0, 9.0, 3.0, 6.0])}]
    cores = [{"x": jnp.array([T, T, F, F, F])}, {"x": jnp.array([T, T, F, F, F])},
             {"x": jnp.array([T, F, T, F, F])}]
    fused, report = fusion.fuse(backbone, tuned, cores)
    np.testing.assert_allclose(fused["x"], [-5.0, -3.0, 9.0, 2.0, 4.0], rtol=1e-6)
    assert report["pairwise_overlap"] == [[2, 2, 1], [2, 2, 1], [1, 1, 2]]
    assert report["core_union"] == 3 and report["overlap_entries"] == 2
    assert report["transplanted"] == [0, 1, 2]
    fused, report = fusion.fuse(backbone, tuned, cores, overlap="mean")
    np.testing.assert_allclose(fused["x"], [-2 / 3, -1.0, 9.0, 2.0, 4.0], rtol=1e-6)
    fused, report = fusion.fuse(backbone, tuned, cores, overlap="first")
    np.testing.assert_allclose(fused["x"], [1.0, 1.0, 9.0, 2.0, 4.0], rtol=1e-6)
    assert report["transplanted"] == [2, 0, 1]


def test_no_cores_is_the_slerp_merge_and_all_cores_is_pure_transplant():
    backbone, tuned, cores = literal_case()
    none = [jax.tree.map(jnp.zeros_like, c) for c in cores]
    fused, report = fusion.fuse(backbone, tuned, none)
    assert_tree_close(fused, merges.get("slerp")(tuned))
    assert report["core_union"] == 0 and report["merged_entries"] == 10
    every = [jax.tree.map(jnp.ones_like, cores[0]), jax.tree.map(jnp.zeros_like, cores[1])]
    fused, report = fusion.fuse(backbone, tuned, every)
    assert_tree_close(fused, tuned[0], rtol=0, atol=0)
    assert report["transplanted"] == [10, 0]


# ------------------------------------------------------------------------ random properties


def random_case(seed, shapes, n=2, density=0.3, dtype=np.float32):
    rng = np.random.default_rng(seed)
    backbone = {f"l{i}": rng.standard_normal(s).astype(dtype) for i, s in enumerate(shapes)}
    tuned = [{k: (v + rng.standard_normal(v.shape)).astype(dtype) for k, v in backbone.items()} for _ in range(n)]
    cores = [{k: rng.random(v.shape) < density for k, v in backbone.items()} for _ in range(n)]
    return backbone, tuned, cores


def reference_core_values(backbone, tuned, cores, rule):
    """Per-leaf float64 NumPy core values and winner counts, written from the docstring."""
    values, winners = {}, np.zeros(len(tuned), np.int64)
    for key in backbone:
        b = np.asarray(backbone[key], np.float64)
        xs = np.stack([np.asarray(t[key], np.float64) for t in tuned])
        ms = np.stack([np.asarray(c[key]) for c in cores])
        if rule == "mean":
            values[key] = np.where(ms, xs, 0).sum(0) / np.maximum(ms.sum(0), 1)
            continue
        score = np.abs(xs - b) if rule == "max_delta" else -np.arange(len(tuned))[:, None].repeat(b.size, 1).reshape(xs.shape)
        score = np.where(ms, score, -np.inf)
        win = np.argmax(score, axis=0)  # argmax picks the lowest index among ties
        values[key] = np.take_along_axis(xs, win[None], 0)[0]
        in_core = ms.any(0)
        winners += np.bincount(win[in_core], minlength=len(tuned))
    return values, winners


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 3),
    rule=st.sampled_from(fusion.OVERLAP_RULES),
    granularity=st.sampled_from(["leaf", "row"]),
)
@pytest.mark.slow  # several seconds of compilation: kept out of the fast tier
def test_matches_masked_slerp_and_transplant_reference(seed, n, rule, granularity):
    shapes = [(6, 5), (), (2, 3, 4)]
    backbone, tuned, cores = random_case(seed, shapes, n=n)
    fused, report = fusion.fuse(backbone, tuned, cores, overlap=rule, granularity=granularity)
    union = {k: np.logical_or.reduce([c[k] for c in cores]) for k in backbone}
    merged = merges.get("slerp")(tuned, mask={k: ~u for k, u in union.items()}, granularity=granularity)
    core_values, winners = reference_core_values(backbone, tuned, cores, rule)
    for k in backbone:
        out = np.asarray(fused[k])
        assert out.dtype == np.float32 and out.shape == backbone[k].shape
        u = union[k]
        # fuse folds in one pass from the Gram matrix, slerp.merge step by step: equal up to
        # float32 rounding, which short rows near the linear-fallback edge amplify (coefficients
        # up to 1 / sin(acos(0.9995)) ~ 32, and a rounding may flip the branch there).
        np.testing.assert_allclose(out[~u], np.asarray(merged[k])[~u], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(out[u], core_values[k][u], rtol=1e-6, atol=1e-6)
    ms = {k: np.stack([c[k] for c in cores]) for k in backbone}
    assert report["core_union"] == sum(int(u.sum()) for u in union.values())
    assert report["overlap_entries"] == sum(int((m.sum(0) >= 2).sum()) for m in ms.values())
    assert report["core_sizes"] == [sum(int(c[k].sum()) for k in backbone) for c in cores]
    if rule != "mean":
        assert report["transplanted"] == winners.tolist()
    assert report["total_params"] == sum(int(np.size(b)) for b in backbone.values())


def test_bfloat16_leaves_keep_their_dtype():
    backbone, tuned, cores = random_case(1, [(4, 8)], dtype=np.float32)
    to_bf16 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), t)  # noqa: E731
    fused, _ = fusion.fuse(to_bf16(backbone), [to_bf16(t) for t in tuned], cores)
    assert fused["l0"].dtype == jnp.bfloat16
    u = cores[0]["l0"] | cores[1]["l0"]
    ref = merges.get("slerp")([to_bf16(t) for t in tuned], mask={"l0": ~u})["l0"]
    np.testing.assert_allclose(np.asarray(fused["l0"], np.float32)[~u], np.asarray(ref, np.float32)[~u],
                               rtol=1e-2, atol=1e-2)


def test_slerp_options_reach_the_kernel():
    backbone, tuned, cores = random_case(2, [(5, 4), (9,)], n=3)
    union = {k: np.logical_or.reduce([c[k] for c in cores]) for k in backbone}
    kw = dict(weights=[1.0, 2.0, 3.0])
    fused, _ = fusion.fuse(backbone, tuned, cores, **kw)
    merged = merges.get("slerp")(tuned, mask={k: ~u for k, u in union.items()}, **kw)
    for k in backbone:
        np.testing.assert_allclose(np.asarray(fused[k])[~union[k]], np.asarray(merged[k])[~union[k]],
                                   rtol=1e-5, atol=1e-5)
    per_leaf_t = {"l0": 0.0, "l1": 1.0}
    fused, _ = fusion.fuse(backbone, tuned[:2], cores[:2], t=per_leaf_t)
    u0 = cores[0]["l0"] | cores[1]["l0"]
    u1 = cores[0]["l1"] | cores[1]["l1"]
    np.testing.assert_allclose(np.asarray(fused["l0"])[~u0], tuned[0]["l0"][~u0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fused["l1"])[~u1], tuned[1]["l1"][~u1], rtol=1e-6)


# ------------------------------------------------------------------------------ the 1-D mesh


def mesh8():
    assert len(jax.devices()) == 8, "tests/conftest.py fakes 8 CPU devices"
    return Mesh(np.array(jax.devices()), ("d",))


# leading dims divisible by 8 (sharded) and not (replicated over the mesh); 1-D and scalars
MESH_SHAPES = [(16, 5), (24,), (8192,), (10, 3), (7,), ()]


@pytest.mark.parametrize(
    "rule, granularity",
    [pytest.param(rule, granularity, marks=[pytest.mark.slow])
     for rule in fusion.OVERLAP_RULES for granularity in ("leaf", "row")
     if granularity == "leaf" or rule == "max_delta"])
def test_mesh_equals_single_device(rule, granularity):
    backbone, tuned, cores = random_case(3, MESH_SHAPES, n=3)
    single, report = fusion.fuse(backbone, tuned, cores, overlap=rule, granularity=granularity)
    mesh = mesh8()
    sharded, mesh_report = fusion.fuse(backbone, tuned, cores, overlap=rule, granularity=granularity, mesh=mesh)
    assert mesh_report == report
    for key in backbone:
        np.testing.assert_allclose(np.asarray(sharded[key]), np.asarray(single[key]), rtol=1e-5, atol=1e-6)
    # Leading dim 16: split over the mesh; the others are replicated, none on a single device.
    assert sharded["l0"].sharding.spec == jax.P("d")
    for key in backbone:
        assert len(sharded[key].sharding.device_set) == 8, key


@pytest.mark.slow
def test_mesh_with_another_operator():
    backbone, tuned, cores = random_case(4, MESH_SHAPES, n=2)
    single, report = fusion.fuse(backbone, tuned, cores, merge="linear")
    sharded, mesh_report = fusion.fuse(backbone, tuned, cores, merge="linear", mesh=mesh8())
    assert mesh_report == report
    assert_tree_close(sharded, single)


def test_mesh_must_have_one_axis():
    backbone, tuned, cores = literal_case()
    mesh2d = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    with pytest.raises(ValueError, match="exactly one axis"):
        fusion.fuse(backbone, tuned, cores, mesh=mesh2d)
    with pytest.raises(ValueError, match="must be a jax.sharding.Mesh"):
        fusion.fuse(backbone, tuned, cores, mesh="d")


def kernel_leaves(backbone, tuned, cores, **kw):
    """``fusion_kernel.fuse_leaves`` on the leaves of a SLERP fusion with equal weights."""
    keys = sorted(backbone)
    steps = np.asarray([1.0 / i for i in range(2, len(tuned) + 1)], np.float32)
    return fusion_kernel.fuse_leaves(
        [backbone[k] for k in keys], [[t[k] for t in tuned] for k in keys],
        [[c[k] for c in cores] for k in keys], [steps] * len(keys), rule="max_delta", slerp=True, **kw)


@pytest.mark.parametrize("row_slerp", [False, True])
@pytest.mark.parametrize("rows", [9, pytest.param(7, marks=pytest.mark.slow), 1])
def test_pass_one_in_parallel_row_blocks_equals_one_block(row_slerp, rows):
    """Big leaves' first pass runs as row blocks in threads; sums and counts must not change
    (odd row counts give a shorter last block; one row cannot be split)."""
    backbone, tuned, cores = random_case(11, [(rows, 8), (40,), (3, 2, 4)], n=3)
    whole, whole_counts = kernel_leaves(backbone, tuned, cores, row_slerp=row_slerp, row_blocks=1)
    blocks, block_counts = kernel_leaves(backbone, tuned, cores, row_slerp=row_slerp, row_blocks=3,
                                         block_min_entries=1)
    for a, b, x, y in zip(whole, blocks, whole_counts, block_counts):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


# -------------------------------------------------------------- the kernel equals the definition

TASK_COUNTS = [pytest.param(1, marks=pytest.mark.slow), 2, 3, pytest.param(4, marks=pytest.mark.slow)]
BACKEND_SHAPES = [(6, 5), (), (9,)]


@pytest.mark.parametrize("n", TASK_COUNTS)
@pytest.mark.parametrize("rule", fusion.OVERLAP_RULES)
def test_kernel_equals_definition_bit_for_bit_with_linear(rule, n):
    """With an operator other than SLERP both backends apply the same float32 operations to
    the same merged leaf: the results agree to the bit, and so do the reports."""
    backbone, tuned, cores = random_case(20 + n, BACKEND_SHAPES, n=n, density=0.4)
    weights = [float(i + 1) for i in range(n)]
    kernel, k_report = fusion.fuse(backbone, tuned, cores, merge="linear", overlap=rule,
                                   weights=weights, backend="kernel")
    definition, d_report = fusion.fuse(backbone, tuned, cores, merge="linear", overlap=rule,
                                       weights=weights, backend="definition")
    assert k_report == d_report
    for k in backbone:
        np.testing.assert_array_equal(np.asarray(kernel[k]), np.asarray(definition[k]))


@pytest.mark.parametrize("granularity", ["leaf", "row"])
@pytest.mark.parametrize("n", TASK_COUNTS)
@pytest.mark.parametrize("rule", fusion.OVERLAP_RULES)
def test_kernel_equals_definition_with_slerp(rule, n, granularity):
    """SLERP: the kernel folds in one pass from the Gram matrix, the definition step by step;
    equal to float32 rounding on the merged entries, to the bit on the cores."""
    backbone, tuned, cores = random_case(30 + n, BACKEND_SHAPES, n=n, density=0.4)
    kernel, k_report = fusion.fuse(backbone, tuned, cores, overlap=rule, granularity=granularity,
                                   backend="kernel")
    definition, d_report = fusion.fuse(backbone, tuned, cores, overlap=rule, granularity=granularity,
                                       backend="definition")
    assert k_report == d_report
    for k in backbone:
        union = np.logical_or.reduce([c[k] for c in cores])
        got, want = np.asarray(kernel[k]), np.asarray(definition[k])
        np.testing.assert_array_equal(got[union], want[union])
        np.testing.assert_allclose(got[~union], want[~union], rtol=1e-5, atol=1e-5)


def test_definition_is_the_jittable_fuse_leafwise():
    backbone, tuned, cores = random_case(40, [(6, 5), (7,)], n=3)
    eager, _ = fusion.fuse(backbone, tuned, cores, overlap="mean", backend="definition")
    jitted = jax.jit(lambda b, ts, cs: fusion.fuse_leafwise(b, ts, cs, overlap="mean"))(backbone, tuned, cores)
    assert_tree_close(jitted, eager, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------- donation


@pytest.mark.parametrize("use_mesh", [False, True])
def test_donated_backbone_gives_the_same_result(use_mesh):
    backbone, tuned, cores = random_case(5, [(16, 4), (10,), (9, 2)], n=2)
    mesh = mesh8() if use_mesh else None
    expected, report = fusion.fuse(backbone, tuned, cores, mesh=mesh)
    donated = jax.tree.map(jnp.array, backbone)  # fresh device buffers we may give away
    if use_mesh:
        donated = {k: fusion_kernel.place(v, mesh, fusion_kernel.is_sharded(v.shape, mesh)) for k, v in donated.items()}
    fused, donated_report = fusion.fuse(donated, tuned, cores, mesh=mesh, donate_backbone=True)
    assert donated_report == report
    assert_tree_close(fused, expected, rtol=0, atol=0)
    assert donated["l0"].is_deleted()  # the output was written into the backbone's buffer
    for v in tuned[0].values():  # the task models are never donated
        assert np.isfinite(v).all()


@pytest.mark.parametrize("overlap", fusion.OVERLAP_RULES)
def test_donated_backbone_buffers_hold_the_output(overlap):
    """Every rule writes into the donated buffers, also the rules that never read the backbone
    (a program that drops the unused backbone cannot reuse its buffer)."""
    backbone, tuned, cores = random_case(6, [(16, 4), (10,)], n=2)
    donated = jax.tree.map(jnp.array, backbone)
    buffers = {k: v.unsafe_buffer_pointer() for k, v in donated.items()}
    fused, _ = fusion.fuse(donated, tuned, cores, overlap=overlap, donate_backbone=True)
    assert {k: v.unsafe_buffer_pointer() for k, v in fused.items()} == buffers


# -------------------------------------------------------------------------------- bad input


def test_bad_input():
    backbone, tuned, cores = literal_case()
    with pytest.raises(ValueError, match="tuned_models is empty"):
        fusion.fuse(backbone, [], [])
    with pytest.raises(ValueError, match="got 1 core_masks for 2 tuned_models"):
        fusion.fuse(backbone, tuned, cores[:1])
    with pytest.raises(ValueError, match="tuned_models must be a list"):
        fusion.fuse(backbone, {"a": tuned[0]}, cores)
    bad_shape = [cores[0], {"v": cores[1]["v"], "w": jnp.ones((3, 2), bool)}]
    with pytest.raises(ValueError, match=r"leaf 'w': backbone has shape \(2, 3\), core_masks\[1\] has shape \(3, 2\)"):
        fusion.fuse(backbone, tuned, bad_shape)
    missing = [cores[0], {"w": cores[1]["w"]}]
    with pytest.raises(ValueError, match=r"leaf 'v' is in backbone but missing from core_masks\[1\]"):
        fusion.fuse(backbone, tuned, missing)
    not_bool = [cores[0], {"v": cores[1]["v"].astype(jnp.float32), "w": cores[1]["w"]}]
    with pytest.raises(ValueError, match=r"leaf 'v': core_masks\[1\] has dtype float32, expected bool"):
        fusion.fuse(backbone, tuned, not_bool)
    with pytest.raises(ValueError, match=r"unknown merge operator 'slurp'; available.*linear.*slerp"):
        fusion.fuse(backbone, tuned, cores, merge="slurp")
    with pytest.raises(ValueError, match="unknown overlap rule 'max'; available: max_delta, mean, first"):
        fusion.fuse(backbone, tuned, cores, overlap="max")
    wrong_model = [tuned[0], {"v": tuned[1]["v"], "w": tuned[1]["w"].astype(jnp.bfloat16)}]
    with pytest.raises(ValueError, match=r"leaf 'w': backbone has dtype float32, tuned_models\[1\] has dtype bfloat16"):
        fusion.fuse(backbone, wrong_model, cores)
    with pytest.raises(ValueError, match="fuse sets \\['mask'\\]"):
        fusion.fuse(backbone, tuned, cores, mask=cores[0])
    with pytest.raises(TypeError, match="unknown slerp option"):
        fusion.fuse(backbone, tuned, cores, density=0.5)
    with pytest.raises(ValueError, match="t for leaf 'v' must be in"):
        fusion.fuse(backbone, tuned, cores, t=2.0)
    ints = {"v": jnp.zeros(4, jnp.int32), "w": jnp.zeros((2, 3), jnp.int32)}
    with pytest.raises(ValueError, match="leaf 'v' has dtype int32; fuse needs floating leaves"):
        fusion.fuse(ints, [ints, ints], cores)
    with pytest.raises(ValueError, match="backend must be one of"):
        fusion.fuse(backbone, tuned, cores, backend="gpu")
    with pytest.raises(ValueError, match="a mesh needs backend='kernel'"):
        fusion.fuse(backbone, tuned, cores, backend="definition", mesh=mesh8())


@settings(max_examples=10, deadline=None)
@given(mask=hnp.arrays(np.bool_, (2, 3)), backend=st.sampled_from(fusion.BACKENDS))
def test_mask_entries_decide_core_or_merge(mask, backend):
    # Task 0's core is ``mask``, task 1 has none: entries in the mask take task 0's value, the
    # others the plain mean of both tasks (values exact in float32).
    backbone = {"w": jnp.zeros((2, 3))}
    x0, x1 = np.arange(6.0).reshape(2, 3) - 2.5, 4.0 * np.arange(6.0).reshape(2, 3) + 1.0
    cores = [{"w": jnp.asarray(mask)}, {"w": jnp.zeros((2, 3), bool)}]
    fused, report = fusion.fuse(backbone, [{"w": jnp.asarray(x0)}, {"w": jnp.asarray(x1)}], cores,
                                merge="linear", backend=backend)
    np.testing.assert_array_equal(fused["w"], np.where(mask, x0, (x0 + x1) / 2))
    k = int(mask.sum())
    assert report["core_union"] == k and report["merged_entries"] == 6 - k
    assert report["transplanted"] == [k, 0] and report["pairwise_overlap"] == [[k, 0], [0, 0]]


def test_cpi_operator_under_jit_with_only_the_models_traced():
    """A base closed over as a constant while the models are traced must take the jittable
    path (fuse's report needs concrete counts)."""
    backbone, tuned, _ = random_case(3, [(6, 5), (4,)], n=2)
    cpi = merges.get("cpi")
    eager = cpi(tuned, base=backbone, fraction=0.2)
    jitted = jax.jit(lambda models: cpi(models, base=backbone, fraction=0.2))(tuned)
    assert_tree_close(jitted, eager, rtol=1e-5, atol=1e-6)
