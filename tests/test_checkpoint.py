"""Tests for cpift_jax.training.checkpoints: params and masks round trips, no overwriting, clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpift_jax.training import checkpoints


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


def test_masks_round_trip_bit_packed(tmp_path):
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
