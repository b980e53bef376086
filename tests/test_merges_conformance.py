"""Every merge operator in cpift_jax/merges/ passes the same checks.

Operators are discovered with ``merges.available()``, so a new file is tested as soon as it
exists. A module tells this test what applies to it through optional module attributes
(documented in docs/adding_a_merge_operator.md):

    REQUIRES_BASE = False          # merge() raises ValueError without base=
    MIN_MODELS = 1                 # fewest models it accepts
    MAX_MODELS = None              # most models it accepts (None: any number)
    STOCHASTIC = False             # takes an int ``seed``; same seed -> same result
    EXAMPLE_HPARAMS = {}           # hyperparameters used by every check below
    PER_LEAF_HPARAMS = ()          # names that also accept a pytree of per-leaf scalars
    INTERPOLATION_ENDPOINTS = ()   # ((hparams, i), ...): merging two models with these
                                   # hparams (on top of EXAMPLE_HPARAMS) returns models[i]
    FORWARDS_KWARGS = False        # merge() has **kwargs that it passes to another operator
                                   # (which still rejects a mistyped name with TypeError)

Checks that only apply to some operators are parametrized over the operators that declare
them, so nothing is skipped; ``test_declarations_match_the_signature`` makes sure an operator
cannot dodge a check by leaving a declaration out.
"""

from __future__ import annotations

import dataclasses
import inspect
import pathlib

import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import strategies as st

from cpift_jax import merges
from cpift_jax import tree as tree_lib

OPERATORS = merges.available()
_KNOWN_ATTRIBUTES = {
    "REQUIRES_BASE",
    "MIN_MODELS",
    "MAX_MODELS",
    "STOCHASTIC",
    "EXAMPLE_HPARAMS",
    "PER_LEAF_HPARAMS",
    "INTERPOLATION_ENDPOINTS",
    "FORWARDS_KWARGS",
}
# Hyperparameters that are naturally per-parameter (a different density for attention and
# MLP); an operator taking one must accept it as a pytree of per-leaf scalars.
_PER_LEAF_NAMES = {"t", "density", "scale", "drop_rate", "gamma", "tall_lambda"}
# Operators for which merging two models can never return one of them exactly, with why.
_NO_ENDPOINTS = {
    "model_stock": "t comes from the angle between the task vectors; no setting picks a model",
    "cpi": "each model's core is transplanted, so the result mixes both models by design",
}


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    merge: object
    requires_base: bool
    min_models: int
    max_models: int | None
    stochastic: bool
    example: dict
    per_leaf: tuple
    endpoints: tuple
    forwards_kwargs: bool

    @property
    def n_models(self) -> int:
        """Three models where allowed: more than two exercises the n-ary code paths."""
        return max(self.min_models, min(3, self.max_models or 3))

    def call(self, models, base=None, **overrides):
        hparams = {**self.example, **overrides}
        return self.merge(models, base=base, **hparams)


def spec(name: str) -> Spec:
    module = merges.get_module(name)
    return Spec(
        name=name,
        merge=module.merge,
        requires_base=getattr(module, "REQUIRES_BASE", False),
        min_models=getattr(module, "MIN_MODELS", 1),
        max_models=getattr(module, "MAX_MODELS", None),
        stochastic=getattr(module, "STOCHASTIC", False),
        example=dict(getattr(module, "EXAMPLE_HPARAMS", {})),
        per_leaf=tuple(getattr(module, "PER_LEAF_HPARAMS", ())),
        endpoints=tuple(getattr(module, "INTERPOLATION_ENDPOINTS", ())),
        forwards_kwargs=bool(getattr(module, "FORWARDS_KWARGS", False)),
    )


SPECS = {name: spec(name) for name in OPERATORS}
WITH_ENDPOINTS = [n for n, s in SPECS.items() if s.endpoints]
WITH_PER_LEAF = [n for n, s in SPECS.items() if s.per_leaf]
STOCHASTIC = [n for n, s in SPECS.items() if s.stochastic]


def params(seed: int, scale: float = 1.0) -> dict:
    """A small parameter tree: a 2-D and a 1-D float32 leaf, a bf16 leaf, a scalar, a list."""
    rng = np.random.default_rng(seed)

    def arr(shape, dtype=jnp.float32):
        return jnp.asarray(scale * rng.normal(size=shape), dtype)

    return {
        "embed": {"embedding": arr((6, 4))},
        "layers": [
            {"mlp": {"kernel": arr((4, 5), jnp.bfloat16), "bias": arr((5,))}},
            {"mlp": {"kernel": arr((4, 5), jnp.bfloat16), "bias": arr((5,))}},
        ],
        "norm": {"scale": arr(())},
    }


def near(base: dict, seed: int, step: float = 0.1) -> dict:
    """A 'fine-tuned' tree: base plus a small random update (exact in the leaf dtype)."""
    update = params(seed, step)
    def add(b, u):
        return (b.astype(jnp.float32) + u.astype(jnp.float32)).astype(b.dtype)

    return jax.tree.map(add, base, update)


def same_leaves(a, b) -> list[bool]:
    return [np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]


def inputs(s: Spec, n: int | None = None):
    base = params(0)
    models = [near(base, 10 + i) for i in range(n or s.n_models)]
    return models, base


def assert_trees_close(actual, expected, *, exact_bf16=False):
    check = tree_lib.check_same_structure
    check(actual, expected, names=("result", "expected"))
    leaves = zip(tree_lib.leaf_paths(expected), jax.tree.leaves(actual), jax.tree.leaves(expected))
    for path, a, e in leaves:
        a32, e32 = np.asarray(a, np.float32), np.asarray(e, np.float32)
        if e.dtype == jnp.bfloat16:
            tol = dict(rtol=0, atol=0) if exact_bf16 else dict(rtol=1e-2, atol=1e-2)
        else:
            tol = dict(rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a32, e32, err_msg=f"leaf '{path}'", **tol)


@pytest.fixture(params=OPERATORS)
def op(request) -> Spec:
    return SPECS[request.param]


def test_every_operator_module_is_discovered():
    package = pathlib.Path(merges.__file__).parent
    on_disk = {p.stem for p in package.glob("*.py") if not p.name.startswith("_")}
    assert set(OPERATORS) == on_disk
    expected = {"linear", "slerp", "task_arithmetic", "ties", "dare", "breadcrumbs",
                "model_stock", "multislerp", "karcher", "stitch", "consensus", "cpi"}
    assert expected <= set(OPERATORS)
    # Each conditional check below runs on at least one operator.
    assert WITH_ENDPOINTS and WITH_PER_LEAF and STOCHASTIC


def test_declarations_match_the_signature(op):
    """An operator declares every conditional check that applies to it."""
    parameters = inspect.signature(op.merge).parameters
    assert ("seed" in parameters) == op.stochastic, f"{op.name}: seed <-> STOCHASTIC = True"
    missing = (_PER_LEAF_NAMES & set(parameters)) - set(op.per_leaf)
    assert not missing, f"{op.name}: declare {sorted(missing)} in PER_LEAF_HPARAMS"
    if op.name in _NO_ENDPOINTS:
        assert not op.endpoints, f"{op.name} declares endpoints; drop it from _NO_ENDPOINTS"
    else:
        assert op.endpoints, f"{op.name}: declare INTERPOLATION_ENDPOINTS (or explain why not)"
    if op.min_models > 1:
        assert op.n_models >= op.min_models


def test_module_declares_only_known_attributes(op):
    module = merges.get_module(op.name)
    upper = {a for a in vars(module) if a.isupper() and not a.startswith("_")}
    # A misspelt attribute (INTERPOLATION_ENDPOINT) would silently switch a check off.
    suffixes = ("BASE", "MODELS", "STOCHASTIC", "HPARAMS", "ENDPOINTS", "ENDPOINT")
    unknown = {a for a in upper if a.endswith(suffixes)} - _KNOWN_ATTRIBUTES
    assert not unknown, f"{op.name}: unknown attributes {unknown}"
    for hparams, index in op.endpoints:
        assert isinstance(hparams, dict) and index in (0, 1)
    assert set(op.per_leaf) <= set(inspect.signature(op.merge).parameters)


def test_signature_takes_models_base_and_weights_and_no_catch_all_kwargs(op):
    parameters = inspect.signature(op.merge).parameters
    assert list(parameters)[0] == "models"
    for name in ("base", "weights"):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, f"{op.name}: {name}"
    # A **kwargs would swallow a mistyped hyperparameter instead of failing; only an operator
    # that forwards them to another one (which rejects unknown names, see
    # test_unknown_hyperparameter_raises) may take them.
    catch_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    assert not catch_all or op.forwards_kwargs, f"{op.name}: **kwargs without FORWARDS_KWARGS"


def test_preserves_structure_shapes_and_dtypes(op):
    models, base = inputs(op)
    out = op.call(models, base=base)
    # Compares paths, shapes and dtypes: the bf16 kernels must come back as bf16.
    tree_lib.check_same_structure(out, models[0], names=("result", "models[0]"))
    assert out["layers"][0]["mlp"]["kernel"].dtype == jnp.bfloat16
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(out))


def test_accepts_nnx_state_and_returns_it(op):
    models, base = inputs(op)
    out = op.call([nnx.State(m) for m in models], base=nnx.State(base))
    assert isinstance(out, nnx.State)
    assert tree_lib.leaf_paths(out) == tree_lib.leaf_paths(base)
    assert all(same_leaves(out, op.call(models, base=base)))


def test_identical_inputs_give_that_input_back(op):
    _, x = inputs(op)
    models = [x] * op.n_models
    assert_trees_close(op.call(models, base=x), x, exact_bf16=True)
    if not op.requires_base:
        assert_trees_close(op.call(models), x, exact_bf16=True)


def test_without_base_raises_if_required(op):
    models, base = inputs(op)
    if op.requires_base:
        with pytest.raises(ValueError, match="base"):
            op.call(models)
    else:
        op.call(models)  # must work without a base


def test_mismatched_models_name_the_leaf(op):
    models, base = inputs(op)
    bad = jax.tree.map(lambda x: x, models[-1])
    bad["layers"][1]["mlp"]["bias"] = jnp.zeros(7)
    with pytest.raises(ValueError, match="layers/1/mlp/bias"):
        op.call([*models[:-1], bad], base=base)


def test_too_few_models_raise(op):
    models, base = inputs(op)
    with pytest.raises(ValueError):
        op.call(models[: op.min_models - 1], base=base)


def test_unknown_hyperparameter_raises(op):
    models, base = inputs(op)
    with pytest.raises(TypeError):
        op.call(models, base=base, not_a_hyperparameter=1)


@pytest.mark.slow  # compiles each operator's whole graph at once: the slowest check here
def test_runs_under_jit_and_matches_eager(op):
    models, base = inputs(op)
    eager = op.call(models, base=base)
    jitted = jax.jit(lambda ms, b: op.call(ms, base=b))(models, base)
    assert_trees_close(jitted, eager)


def test_inputs_stay_intact_and_no_result_leaks_into_the_next_call(op):
    """Catches donating or overwriting the caller's arrays, and a cached program or buffer
    that hands back an earlier call's result for inputs of the same shapes."""
    models, base = inputs(op)
    before = jax.tree.map(np.array, (models, base))
    first = op.call(models, base=base)
    after = jax.tree.map(np.asarray, (models, base))  # raises on a donated (deleted) array
    for path, a, b in zip(tree_lib.leaf_paths(before), jax.tree.leaves(after),
                          jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b, err_msg=f"{op.name}: input leaf '{path}' changed")
    other = [near(base, 20 + i) for i in range(op.n_models)]
    assert not all(same_leaves(op.call(other, base=base), first)), (
        f"{op.name}: other models of the same shapes gave the same result")
    assert all(same_leaves(op.call(models, base=base), first))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_operators_are_reproducible_from_the_seed(name):
    s = SPECS[name]
    models, base = inputs(s)
    seed = s.example.get("seed", 0)
    first = s.call(models, base=base, seed=seed)
    assert all(same_leaves(first, s.call(models, base=base, seed=seed)))
    assert not all(same_leaves(first, s.call(models, base=base, seed=seed + 1)))


@pytest.mark.parametrize("name", WITH_ENDPOINTS)
def test_interpolation_endpoints(name):
    op = SPECS[name]
    models, base = inputs(op, n=2)
    for hparams, index in op.endpoints:
        out = op.call(models, base=base if op.requires_base else None, **hparams)
        assert_trees_close(out, models[index], exact_bf16=True)


def test_finite_on_degenerate_inputs(op):
    zeros = jax.tree.map(jnp.zeros_like, params(0))
    _, base = inputs(op)
    n = op.n_models
    cases = {
        "all zeros": ([zeros] * n, zeros),
        "zero task vectors": ([base] * n, base),
        # Opposite task vectors cancel: sign elections tie, sphere means lose their direction.
        "antipodal": ([near(base, 1), jax.tree.map(lambda b, m: 2 * b - m, base, near(base, 1))]
                      + [base] * (n - 2), base),
    }
    if op.min_models == 1:
        cases["one model"] = ([near(base, 1)], base)
    for label, (models, b) in cases.items():
        out = op.call(models, base=b)
        for path, leaf in zip(tree_lib.leaf_paths(out), jax.tree.leaves(out)):
            finite = np.isfinite(np.asarray(leaf, np.float32)).all()
            assert finite, f"{op.name}, {label}: leaf '{path}'"


@pytest.mark.parametrize("name", WITH_PER_LEAF)
def test_per_leaf_hyperparameters_equal_to_the_scalar_give_the_same_result(name):
    op = SPECS[name]
    models, base = inputs(op)
    defaults = inspect.signature(op.merge).parameters
    reference = op.call(models, base=base)
    for name in op.per_leaf:
        value = op.example.get(name, defaults[name].default)
        tree = jax.tree.map(lambda _: value, base)
        out = op.call(models, base=base, **{name: tree})
        assert all(same_leaves(out, reference)), name


_leaf = hnp.arrays(
    np.float32,
    (6, 4),  # the embedding's shape: reuses its compiled kernels
    elements=st.floats(-1e3, 1e3, width=32) | st.sampled_from([0.0, -0.0, 1e-30]),
)


@pytest.mark.parametrize("name", OPERATORS)
@hypothesis.settings(max_examples=8, deadline=None, derandomize=True)
@hypothesis.given(data=st.lists(_leaf, min_size=4, max_size=4))
def test_property_finite_and_shape_preserving_on_arbitrary_values(name, data):
    s = SPECS[name]
    n = s.n_models
    trees = [{"w": jnp.asarray(d)} for d in data]
    models = (trees * 2)[1 : 1 + n]
    out = s.call(models, base=trees[0])
    assert out["w"].shape == (6, 4) and out["w"].dtype == jnp.float32
    assert np.isfinite(np.asarray(out["w"])).all()


def test_declares_what_it_applies_to(op):
    """Every operator declares ``merges.DECLARATIONS`` itself (no defaults), and
    ``merges.applicable`` answers from them as the operator behaves: fewer than ``MIN_MODELS``
    models or a missing required base do not apply (the calls above raise for both)."""
    module = merges.get_module(op.name)
    for attr in merges.DECLARATIONS:
        assert attr in vars(module), f"{op.name} does not declare {attr}"
    assert merges.applicable(op.name, op.n_models, has_base=True) == (True, "")
    ok, reason = merges.applicable(op.name, op.min_models - 1, has_base=True)
    assert not ok and f"got {op.min_models - 1}" in reason
    ok, reason = merges.applicable(op.name, op.n_models, has_base=False)
    assert ok != op.requires_base and (ok or "needs a base" in reason)
    if op.max_models is not None:
        assert not merges.applicable(op.name, op.max_models + 1, has_base=True)[0]


DONATING = [n for n in OPERATORS if "donate" in inspect.signature(SPECS[n].merge).parameters]


@pytest.mark.parametrize("name", DONATING)
def test_donating_gives_the_same_result_and_frees_only_the_donated_input(name):
    """``donate=True`` writes into the donated input (``base``, or ``models[0]`` for operators
    without one): the result is unchanged, those arrays are deleted, the others are intact."""
    s = SPECS[name]
    models, base = inputs(s)
    expected = s.call(models, base=base)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    models, base = copy(models), copy(base)
    out = s.call(models, base=base, donate=True)
    assert_trees_close(out, expected, exact_bf16=True)
    donated = base if s.requires_base else models[0]
    kept = models if s.requires_base else models[1:]
    assert all(x.is_deleted() for x in jax.tree.leaves(donated)), f"{name}: nothing donated"
    assert not any(x.is_deleted() for x in jax.tree.leaves(kept))
    # An array passed twice (the base also given as a model) is never donated.
    models, base = inputs(s)
    s.call([base, *models[1:]], base=base, donate=True)
    assert not any(x.is_deleted() for x in jax.tree.leaves(base))


def test_donation_is_opt_in():
    assert DONATING and all(
        inspect.signature(SPECS[n].merge).parameters["donate"].default is False for n in DONATING)
