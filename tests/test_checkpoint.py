"""Tests for cpift_jax.training.checkpoints: params and masks round trips, no overwriting, clear
errors; sharded saves restored onto other meshes, async saves and train states on 8 faked devices
(the two-process versions are in test_distributed.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cpift_jax import masks as masks_lib
from cpift_jax.training import checkpoints
from cpift_jax.training.step import TrainState


def params():
    return {
        "embed": jnp.arange(6.0).reshape(2, 3),
        "layers": [{"w": jnp.array([[1.5, -2.0]], jnp.bfloat16)}, {"w": jnp.array([[3.0, 4.0]], jnp.bfloat16)}],
        "scale": jnp.array(0.25),
    }


def masks():
    # 13 and 3 entries: not multiples of 8, so the packing pads the last byte.
    return {
        "embed": np.array([[True, False, True], [False, False, True]]),
        "layers": [{"w": np.array([[True, True]])}, {"w": np.array([[False, True]])}],
        "scale": np.array(True),
        "wide": np.arange(13) % 3 == 0,
    }


def assert_same(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for x, y in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_params_round_trip_keeps_values_dtypes_and_structure(tmp_path):
    checkpoints.save_params(tmp_path / "ckpt", params())
    assert_same(checkpoints.load_params(tmp_path / "ckpt"), params())
    assert_same(checkpoints.load_params(tmp_path / "ckpt", like=params()), params())


def test_params_refuse_to_overwrite(tmp_path):
    checkpoints.save_params(tmp_path / "ckpt", params())
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        checkpoints.save_params(tmp_path / "ckpt", jax.tree.map(jnp.zeros_like, params()))
    assert_same(checkpoints.load_params(tmp_path / "ckpt"), params())  # untouched


def test_params_load_checks_against_like(tmp_path):
    checkpoints.save_params(tmp_path / "ckpt", params())
    like = dict(params(), embed=jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"leaf 'embed': expected has shape \(3, 2\), .*ckpt has shape \(2, 3\)"):
        checkpoints.load_params(tmp_path / "ckpt", like=like)
    like = dict(params(), extra=jnp.zeros(2))
    with pytest.raises(ValueError, match="leaf 'extra' is in expected but missing"):
        checkpoints.load_params(tmp_path / "ckpt", like=like)


def test_params_missing_and_corrupted(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing parameter checkpoint at .*nowhere"):
        checkpoints.load_params(tmp_path / "nowhere")
    checkpoints.save_params(tmp_path / "ckpt", params())
    for f in (tmp_path / "ckpt").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read the parameter checkpoint .*ckpt"):
        checkpoints.load_params(tmp_path / "ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot read the parameter checkpoint .*empty"):
        checkpoints.load_params(tmp_path / "empty")


def test_masks_round_trip(tmp_path):
    checkpoints.save_masks(tmp_path / "core", masks())
    restored = checkpoints.load_masks(tmp_path / "core", like=masks())
    assert_same(restored, masks())
    shapes = json.loads((tmp_path / "core" / "shapes.json").read_text())
    assert shapes == {"embed": [2, 3], "layers/0/w": [1, 2], "layers/1/w": [1, 2], "scale": [], "wide": [13]}
    # the parameters (float leaves of the same shapes) also describe the target structure
    like = jax.tree.map(lambda m: np.zeros(m.shape, np.float32), masks())
    assert_same(checkpoints.load_masks(tmp_path / "core", like=like), masks())


def test_masks_refuse_to_overwrite_and_check_shapes(tmp_path):
    checkpoints.save_masks(tmp_path / "core", masks())
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        checkpoints.save_masks(tmp_path / "core", masks())
    wrong = dict(masks(), wide=np.zeros(12, bool))
    with pytest.raises(ValueError, match=r"leaf .wide.: parameters has shape \(12,\), masks at .*core has shape \(13,\)"):
        checkpoints.load_masks(tmp_path / "core", like=wrong)


def test_masks_missing_and_corrupted(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing JSON artifact at .*shapes.json"):
        checkpoints.load_masks(tmp_path / "nowhere", like=masks())
    checkpoints.save_masks(tmp_path / "core", masks())
    (tmp_path / "core" / "shapes.json").write_text('{"embed": [2, ')
    with pytest.raises(ValueError, match="corrupted JSON artifact .*shapes.json"):
        checkpoints.load_masks(tmp_path / "core", like=masks())


def test_json_is_written_atomically(tmp_path):
    target = tmp_path / "sub" / "meta.json"
    checkpoints.write_json(target, {"b": 1, "a": [1, 2]})
    assert checkpoints.read_json(target) == {"a": [1, 2], "b": 1}
    checkpoints.write_json(target, {"b": 2})  # metadata may be replaced, never half-written
    assert checkpoints.read_json(target) == {"b": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["meta.json"]  # no temporary left


def _mesh(shape, axes=("x", "y")):
    return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def sharded(mesh):
    """params() with a bigger embedding laid out on ``mesh``: split along both axes, the small
    leaves replicated."""
    specs = {"embed": P("x", "y"), "layers": [{"w": P()}, {"w": P()}], "scale": P()}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    tree = dict(params(), embed=jnp.arange(32.0).reshape(8, 4))
    return jax.device_put(tree, shardings), shardings


def test_sharded_params_restore_onto_another_mesh_with_its_shardings(tmp_path):
    saved, _ = sharded(_mesh((4, 2)))
    pending = checkpoints.save_params(tmp_path / "ckpt", saved, wait=False)
    pending.wait()
    for shape in ((2, 4), (8, 1)):
        like, shardings = sharded(_mesh(shape))
        restored = checkpoints.load_params(tmp_path / "ckpt", like)
        assert jax.tree.map(lambda x: x.sharding, restored) == shardings
        assert_same(restored, saved)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            *sharded(_mesh((8, 1))))
    restored = checkpoints.load_params(tmp_path / "ckpt", abstract)
    assert jax.tree.map(lambda x: x.sharding, restored) == sharded(_mesh((8, 1)))[1]
    assert_same(restored, saved)


def test_load_params_returns_the_structure_of_like(tmp_path):
    from flax import nnx

    checkpoints.save_params(tmp_path / "ckpt", {"a": {"w": np.ones(3, np.float32)}})
    like = nnx.State({"a": {"w": jnp.zeros(3)}})
    restored = checkpoints.load_params(tmp_path / "ckpt", like)
    assert jax.tree.structure(restored) == jax.tree.structure(like)
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(restored)[0]), np.ones(3))


def test_sharded_masks_round_trip_keep_their_shardings(tmp_path):
    mesh = _mesh((4, 2))
    mask = {"a": np.arange(32).reshape(8, 4) % 5 == 0, "b": np.arange(13) % 3 == 0}
    shardings = {"a": NamedSharding(mesh, P("x", "y")), "b": NamedSharding(mesh, P())}
    checkpoints.save_masks(tmp_path / "core", jax.device_put(mask, shardings))
    like = {"a": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("y", "x"))),
            "b": jnp.zeros(13)}
    restored = checkpoints.load_masks(tmp_path / "core", like)
    assert restored["a"].sharding == like["a"].sharding and restored["a"].dtype == np.bool_
    assert_same(restored, mask)


def test_masks_written_bit_packed_by_earlier_versions_still_load(tmp_path):
    checkpoints.save_params(tmp_path / "core" / "packed", masks_lib.pack(masks()))
    checkpoints.write_json(tmp_path / "core" / "shapes.json",
                           {"embed": [2, 3], "layers/0/w": [1, 2], "layers/1/w": [1, 2], "scale": [],
                            "wide": [13]})
    assert_same(checkpoints.load_masks(tmp_path / "core", like=masks()), masks())


def _opt_state(p):
    import optax

    return optax.adamw(1e-3).init(p)


def _state(params, opt_state, step):
    return TrainState(params, opt_state, np.int32(step))


def test_train_state_round_trip_onto_another_mesh(tmp_path):
    saved, _ = sharded(_mesh((4, 2)))
    opt_state = jax.tree.map(lambda x: x + 3, _opt_state(saved))
    point = checkpoints.ResumePoint(_state(saved, opt_state, 12), {"next_index": 12})
    checkpoints.save_train_state(tmp_path / "ts", point)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        checkpoints.save_train_state(tmp_path / "ts", point)
    mesh = _mesh((8, 1))
    like, shardings = sharded(mesh)
    step_sharding = NamedSharding(mesh, P())
    restored = checkpoints.load_train_state(
        tmp_path / "ts", TrainState(like, _opt_state(like), jax.device_put(np.int32(0),
                                                                            step_sharding)))
    assert int(restored.state.step) == 12 and restored.data_state == {"next_index": 12}
    assert restored.state.step.sharding == step_sharding
    assert_same(restored.state.params, saved)
    assert_same(restored.state.opt_state, opt_state)
    assert jax.tree.map(lambda x: x.sharding, restored.state.params) == shardings
    with pytest.raises(ValueError, match=r"leaf 'opt_state/0/mu/embed': expected has shape \(2, 3\)"):
        checkpoints.load_train_state(tmp_path / "ts", _state(params(), _opt_state(params()), 0))


def test_train_checkpoints_keep_the_latest_and_resume(tmp_path):
    saved, _ = sharded(_mesh((4, 2)))
    like = _state(saved, _opt_state(saved), 0)
    ckpts = checkpoints.TrainCheckpoints(tmp_path / "stage", max_to_keep=2)
    assert ckpts.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no complete train-state checkpoint"):
        ckpts.restore(like)
    for step in (5, 10, 15):
        scaled = jax.tree.map(lambda x: x * step, saved)
        ckpts.save(checkpoints.ResumePoint(_state(scaled, _opt_state(scaled), step),
                                           {"next_index": step}))
    ckpts.wait()
    assert ckpts.latest_step() == 15
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == ["10", "15"]
    ckpts.close()
    again = checkpoints.TrainCheckpoints(tmp_path / "stage")  # a restarted process
    restored = again.restore(like)
    assert int(restored.state.step) == 15 and restored.data_state == {"next_index": 15}
    assert_same(restored.state.params, jax.tree.map(lambda x: x * 15, saved))
    assert int(again.restore(like, step=10).state.step) == 10
    again.close()
