"""Tests for cpift_jax.hparams: regex rules, layer gradients, per-leaf broadcasting."""

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import strategies as st

from cpift_jax import hparams, merges, tree


def params(num_layers=5):
    layer = {"attn": {"q": jnp.ones((2, 2))}, "mlp": {"up": jnp.ones((2, 3))}}
    return {
        "embed": {"embedding": jnp.ones((4, 2))},
        "layers": [layer] * num_layers,
        "norm": {"scale": jnp.ones(2)},
    }


def test_constant_rules_first_match_wins():
    out = hparams.resolve(params(2), [(r".*/attn/.*", 0.3), (r"layers/.*", 0.7), (r".*", 0.5)])
    assert out["layers"][0]["attn"]["q"] == 0.3
    assert out["layers"][1]["mlp"]["up"] == 0.7
    assert out["embed"]["embedding"] == 0.5 and out["norm"]["scale"] == 0.5


def test_gradient_is_spread_evenly_over_the_layers():
    # Five layers at positions 0, 1/4, 1/2, 3/4, 1; anchors at 0, 1/2, 1.
    out = hparams.resolve(params(5), [(r".*/mlp/.*", [0.0, 1.0, 0.0]), (r".*", [0.2, 0.6])])
    mlp = [out["layers"][i]["mlp"]["up"] for i in range(5)]
    attn = [out["layers"][i]["attn"]["q"] for i in range(5)]
    assert mlp == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    assert attn == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6])


def test_leaves_outside_the_layer_stack_take_the_first_anchor_or_a_stated_rule():
    rules = [(r"norm/.*", 0.9), (r".*", [0.2, 0.6])]
    out = hparams.resolve(params(3), rules)
    assert out["embed"]["embedding"] == pytest.approx(0.2)  # first anchor
    assert out["norm"]["scale"] == 0.9  # its own rule
    last = hparams.resolve(params(3), rules, unlayered="last")
    assert last["embed"]["embedding"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="leaf 'embed/embedding' has no layer index"):
        hparams.resolve(params(3), rules, unlayered="error")


def test_num_layers_can_be_given_for_a_slice_of_the_model():
    out = hparams.resolve(params(2), [(r".*", [0.0, 1.0])], num_layers=5)
    assert out["layers"][1]["mlp"]["up"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="layer 1 but num_layers=1"):
        hparams.resolve(params(2), [(r".*", [0.0, 1.0])], num_layers=1)


def test_single_layer_and_single_anchor():
    out = hparams.resolve(params(1), [(r".*", [0.4, 0.8])])
    assert out["layers"][0]["mlp"]["up"] == pytest.approx(0.4)
    constant = hparams.resolve(params(3), [(r".*", [0.7])])
    assert constant["layers"][2]["attn"]["q"] == pytest.approx(0.7)


def test_layer_gradient_reads_hugging_face_names_with_the_shared_rule():
    """Tensor names such as ``model.layers.2.mlp.weight`` (the streaming merge's keys) take
    their layer from ``tree.layer_index`` as leaf paths do; the embedding is outside."""
    names = {"model.embed_tokens.weight": 0, "model.layers.0.mlp.weight": 0,
             "model.layers.1.mlp.weight": 0, "model.layers.2.mlp.weight": 0}
    out = hparams.resolve(names, [(r".*", [0.0, 1.0])])
    assert out == {"model.embed_tokens.weight": 0.0, "model.layers.0.mlp.weight": 0.0,
                   "model.layers.1.mlp.weight": pytest.approx(0.5),
                   "model.layers.2.mlp.weight": 1.0}


@pytest.mark.parametrize(
    "rules, message",
    [
        ([(r".*/attn/.*", 0.3)], "last rule must be a catch-all"),
        ([(r".*", 0.5), (r"layers/.*", 0.3)], "last rule must be a catch-all"),
        ([], "no rules"),
        ([(r"(", 0.1), (r".*", 0.5)], "invalid regex"),
        ([(r".*", [])], "non-empty list of numbers"),
        ([(r".*", ["a", "b"])], "non-empty list of numbers"),
        ([(".*",)], "must be a \\(regex, value\\) pair"),
    ],
)
def test_bad_rules_are_rejected(rules, message):
    with pytest.raises(ValueError, match=message):
        hparams.resolve(params(2), rules)


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    anchors=st.lists(st.floats(-10, 10), min_size=1, max_size=6),
    position=st.floats(0, 1),
)
def test_interpolated_values_stay_between_neighbouring_anchors(anchors, position):
    value = hparams.interpolate_anchors(anchors, position)
    scaled = position * (len(anchors) - 1)
    lo, hi = int(np.floor(scaled)), int(np.ceil(scaled))
    assert min(anchors[lo], anchors[hi]) - 1e-9 <= value <= max(anchors[lo], anchors[hi]) + 1e-9
    assert hparams.interpolate_anchors(anchors, 0.0) == anchors[0]
    assert hparams.interpolate_anchors(anchors, 1.0) == pytest.approx(anchors[-1])


def test_per_leaf_broadcasts_scalars_and_checks_pytrees():
    tree = {"a": jnp.ones(2), "b": {"c": jnp.ones((2, 2))}}
    assert hparams.per_leaf(0.5, tree, name="density") == [0.5, 0.5]
    assert hparams.per_leaf(np.float32(0.5), tree, name="density") == [0.5, 0.5]
    assert hparams.per_leaf({"b": {"c": 0.2}, "a": 0.1}, tree, name="density") == [0.1, 0.2]
    with pytest.raises(ValueError, match="density: no value for leaf 'b/c'"):
        hparams.per_leaf({"a": 0.1}, tree, name="density")
    with pytest.raises(ValueError, match="density: leaf 'd' is not a parameter"):
        hparams.per_leaf({"a": 0.1, "b": {"c": 0.2}, "d": 1.0}, tree, name="density")
    with pytest.raises(ValueError, match="density: leaf 'a' must be a scalar"):
        hparams.per_leaf({"a": jnp.ones(2), "b": {"c": 0.2}}, tree, name="density")
    with pytest.raises(ValueError, match="density must be a scalar or a pytree"):
        hparams.per_leaf(jnp.ones(3), tree, name="density")


def test_resolved_rules_reach_an_operator():
    base = {"layers": [{"w": jnp.zeros(4)}, {"w": jnp.zeros(4)}], "head": jnp.zeros(4)}
    model = {"layers": [{"w": jnp.ones(4)}, {"w": jnp.ones(4)}], "head": jnp.ones(4)}
    scale = hparams.resolve(base, [(r"head", 0.0), (r".*", [0.25, 0.75])])
    out = merges.get("task_arithmetic")([model], base=base, scale=scale)
    assert out["layers"][0]["w"].tolist() == [0.25] * 4
    assert out["layers"][1]["w"].tolist() == [0.75] * 4
    assert out["head"].tolist() == [0.0] * 4


def test_operators_name_the_leaf_with_a_bad_per_leaf_value():
    base = {"a": jnp.zeros(4), "b": jnp.zeros(4)}
    with pytest.raises(ValueError, match="density for leaf 'b' must be in \\[0, 1\\], got 1.5"):
        merges.get("ties")([base], base=base, density={"a": 0.5, "b": 1.5})


def test_resolve_works_on_nnx_state_paths():
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([nnx.Linear(2, 2, rngs=nnx.Rngs(i)) for i in range(3)])

    state = nnx.state(Tiny(), nnx.Param)
    out = hparams.resolve(state, [(r".*/bias", 0.0), (r".*", [1.0, 3.0])])
    leaves = dict(zip(tree.leaf_paths(state), jax.tree.leaves(out)))
    assert leaves["layers/2/kernel"] == pytest.approx(3.0) and leaves["layers/1/bias"] == 0.0
