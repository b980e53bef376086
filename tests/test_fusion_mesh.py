"""CPI fusion of models already sharded over a device mesh: a tiny Llama sharded with
``sharding.LLAMA_RULES`` on 8 faked CPU devices (tests/conftest.py), meshes 8x1, 4x2, 2x4.

The fused model must equal the host kernel's to float32 rounding, the report exactly, and
every fused leaf must keep its backbone leaf's sharding (asserted per leaf), never a single
device.
"""

import jax
import numpy as np
import pytest

from cpift_jax import fusion
from test_masks_mesh import MESHES, assert_on_mesh, llama_models, make_mesh, on_mesh


def llama_case(n=2, density=0.05, seed=0):
    base, tuned = llama_models(n, seed)
    rng = np.random.default_rng(seed + 10)
    cores = [jax.tree.map(lambda x: rng.random(x.shape) < density, base) for _ in range(n)]
    return base, tuned, cores


def sharded_case(mesh, base, tuned, cores):
    sharded_base, shardings = on_mesh(base, mesh)
    return sharded_base, [on_mesh(t, mesh)[0] for t in tuned], [on_mesh(c, mesh)[0] for c in cores], shardings


def assert_close(got, want, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", [pytest.param(s, marks=pytest.mark.slow)
                                   for s in ((8, 1), (4, 2), (2, 4))])
def test_fusion_on_a_llama_mesh_equals_the_host_kernel_and_keeps_shardings(shape):
    base, tuned, cores = llama_case()
    want, want_report = fusion.fuse(base, tuned, cores)
    b, ts, cs, shardings = sharded_case(make_mesh(shape), base, tuned, cores)
    got, report = fusion.fuse(b, ts, cs)
    assert report == want_report
    assert_on_mesh(got, shardings)
    assert_close(got, want)


@pytest.mark.slow  # one program per leaf shape and option set
@pytest.mark.parametrize("overlap, granularity", [("mean", "leaf"), ("first", "row"),
                                                  ("max_delta", "row")])
def test_fusion_on_a_mesh_for_every_overlap_rule_and_row_slerp(overlap, granularity):
    base, tuned, cores = llama_case(n=3, density=0.2, seed=1)
    want, want_report = fusion.fuse(base, tuned, cores, overlap=overlap, granularity=granularity)
    b, ts, cs, shardings = sharded_case(make_mesh((2, 4)), base, tuned, cores)
    got, report = fusion.fuse(b, ts, cs, overlap=overlap, granularity=granularity)
    assert report == want_report
    assert_on_mesh(got, shardings)
    assert_close(got, want)


@pytest.mark.slow  # the definition and the operator compile as whole-model programs
def test_definition_and_another_operator_on_a_mesh():
    """The jitted definition on the mesh equals the sharded kernel; an operator other than SLERP
    is traced with its merged leaves sharded like the backbone."""
    base, tuned, cores = llama_case(seed=2)
    b, ts, cs, shardings = sharded_case(make_mesh((4, 2)), base, tuned, cores)
    kernel, report = fusion.fuse(b, ts, cs)
    definition, def_report = fusion.fuse(b, ts, cs, backend="definition")
    assert def_report == report
    assert_on_mesh(definition, shardings)
    assert_close(definition, kernel)
    want, want_report = fusion.fuse(base, tuned, cores, merge="linear")
    got, linear_report = fusion.fuse(b, ts, cs, merge="linear")
    assert linear_report == want_report
    assert_on_mesh(got, shardings)
    assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # one more program per leaf shape
def test_donated_sharded_backbone_holds_the_output():
    base, tuned, cores = llama_case(seed=3)
    b, ts, cs, shardings = sharded_case(make_mesh((4, 2)), base, tuned, cores)
    want, _ = fusion.fuse(b, ts, cs)
    got, _ = fusion.fuse(b, ts, cs, donate_backbone=True)
    assert all(x.is_deleted() for x in jax.tree.leaves(b))
    assert_on_mesh(got, shardings)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_inputs_partly_off_the_mesh_are_refused_by_leaf():
    base, tuned, cores = llama_case(seed=4)
    b, ts, cs, _ = sharded_case(make_mesh((4, 2)), base, tuned, cores)
    with pytest.raises(ValueError, match="fuse: leaf 'lm_head/kernel': tuned_models.1. is not a "
                                         "jax.Array with a NamedSharding"):
        fusion.fuse(b, [ts[0], tuned[1]], cs)
    with pytest.raises(ValueError, match="fuse: leaf 'lm_head/kernel': core_masks.0. lives on mesh"):
        fusion.fuse(b, ts, [on_mesh(cores[0], make_mesh((2, 4)))[0], cs[1]])
