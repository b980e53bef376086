"""Tests for cpift_jax.tree: leaf paths, structure checks and regex rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpift_jax import tree


def _params():
    return {
        "embed": {"embedding": jnp.zeros((5, 2))},
        "layers": [
            {"mlp": {"up_proj": {"kernel": jnp.ones((2, 3))}}, "norm": {"scale": jnp.ones(2)}},
            {"mlp": {"up_proj": {"kernel": jnp.ones((2, 3))}}, "norm": {"scale": jnp.ones(2)}},
        ],
    }


def test_leaf_paths_in_flatten_order():
    assert tree.leaf_paths(_params()) == [
        "embed/embedding",
        "layers/0/mlp/up_proj/kernel",
        "layers/0/norm/scale",
        "layers/1/mlp/up_proj/kernel",
        "layers/1/norm/scale",
    ]


def test_paths_of_nnx_state_drop_the_variable_value_attribute():
    class Tiny(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([nnx.Linear(2, 3, rngs=nnx.Rngs(0))])

    state = nnx.state(Tiny(), nnx.Param)
    assert tree.leaf_paths(state) == ["layers/0/bias", "layers/0/kernel"]
    assert tree.leaf_paths(nnx.to_pure_dict(state)) == ["layers/0/bias", "layers/0/kernel"]


def test_map_with_path_passes_path_and_all_leaves():
    a = {"x": jnp.ones(2), "y": {"z": jnp.zeros(1)}}
    out = tree.map_with_path(lambda p, u, v: f"{p}:{u.shape[0] + v.shape[0]}", a, a)
    assert out == {"x": "x:4", "y": {"z": "y/z:2"}}


@pytest.mark.parametrize(
    "other, message",
    [
        ({"a": jnp.ones(2)}, "leaf 'b/c' is in a but missing from b"),
        ({"a": jnp.ones(2), "b": {"c": jnp.ones(3)}, "d": jnp.ones(1)}, "leaf 'd' is in b but"),
        ({"a": jnp.ones(2), "b": {"c": jnp.ones(4)}}, r"leaf 'b/c': a has shape \(3,\), b has shape \(4,\)"),
        ({"a": jnp.ones(2, jnp.bfloat16), "b": {"c": jnp.ones(3)}}, "leaf 'a': a has dtype float32, b has dtype bfloat16"),
    ],
)
def test_check_same_structure_names_the_first_differing_leaf(other, message):
    a = {"a": jnp.ones(2), "b": {"c": jnp.ones(3)}}
    with pytest.raises(ValueError, match=message):
        tree.check_same_structure(a, other)


def test_check_same_structure_accepts_equal_trees_and_ignores_dtype_on_request():
    a = {"a": jnp.ones(2), "b": [jnp.ones(3)]}
    tree.check_same_structure(a, jax.tree.map(jnp.zeros_like, a))
    tree.check_same_shapes(a, jax.tree.map(lambda x: x > 0, a))


def test_check_same_structure_rejects_same_paths_in_other_containers():
    with pytest.raises(ValueError, match="container types"):
        tree.check_same_structure({"0": jnp.ones(1)}, [jnp.ones(1)])


def test_resolve_rules_first_full_match_wins():
    values = tree.resolve_rules(
        _params(),
        [(r"layers/0/.*", 0.1), (r".*/kernel", 0.5), (r"embed/.*", 0.0), (r".*", 1.0)],
    )
    assert tree.leaf_paths(values) == tree.leaf_paths(_params())
    assert jax.tree.leaves(values) == [0.0, 0.1, 0.1, 0.5, 1.0]


def test_resolve_rules_requires_coverage_and_names_the_uncovered_leaf():
    with pytest.raises(ValueError, match="leaf 'embed/embedding' matches no rule"):
        tree.resolve_rules(_params(), [(r"layers/.*", 1.0)])


def test_resolve_rules_uses_full_match_not_search():
    # "kernel" alone must not match "layers/0/mlp/up_proj/kernel".
    with pytest.raises(ValueError, match="matches no rule"):
        tree.resolve_rules({"a": {"kernel": np.ones(1)}}, [("kernel", 1.0)])


def test_resolve_rules_rejects_bad_regex():
    with pytest.raises(ValueError, match="invalid rule regex"):
        tree.resolve_rules(_params(), [("(", 1.0)])


def test_num_params_counts_scalars():
    assert tree.num_params(_params()) == 10 + 2 * (6 + 2)


@pytest.mark.parametrize("path, layer", [
    ("layers/3/mlp/up_proj/kernel", 3),          # nnx.List / nested dicts
    ("model/layers/12/self_attn/q_proj/kernel", 12),
    ("model/layers_7/attn/q", 7),                # Flax linen auto-names
    ("model.layers.5.mlp.up_proj.weight", 5),    # Hugging Face tensor names
    ("transformer.h.11.attn.c_attn.weight", 11),
    ("blocks/2/mlp/kernel", 2),
    ("model.layers.4", 4),
    ("embed/embedding", None),
    ("model/norm/scale", None),
    ("lm_head.weight", None),
    ("mylayers/3/x", None),                      # "layers" must be a whole component
    ("players/3/w", None),
    ("layers/x3/w", None),
])
def test_layer_index_reads_every_naming_scheme(path, layer):
    assert tree.layer_index(path) == layer


def test_layer_index_is_the_rule_methods_use():
    from cpift_jax.benchmark import methods

    assert methods.layer_group("model/layers/1/mlp/up_proj/kernel") == "1"
    assert methods.layer_group("model/embed_tokens/embedding") == "embed"
    assert methods.layer_group("model/norm/scale") == "final_norm"
    with pytest.raises(ValueError, match="leaf 'other/w' is neither in a layer"):
        methods.layer_group("other/w")
