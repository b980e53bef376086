"""Input checks and small numerics shared by the merge operators."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from cpift_jax import host
from cpift_jax import tree as tree_lib

Pytree = Any


def check_models(models: Sequence[Pytree], base: Pytree | None = None, *, min_models: int = 1):
    """Validates the operator inputs: a non-empty list of same-structure pytrees (and base)."""
    if isinstance(models, dict) or not isinstance(models, Sequence):
        raise TypeError(f"models must be a list of pytrees, got {type(models).__name__}")
    if len(models) < min_models:
        raise ValueError(f"need at least {min_models} model(s) to merge, got {len(models)}")
    for i, model in enumerate(models[1:], start=1):
        tree_lib.check_same_structure(models[0], model, names=("models[0]", f"models[{i}]"))
    if base is not None:
        tree_lib.check_same_structure(models[0], base, names=("models[0]", "base"))


def resolve_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Per-model weights; ``None`` means equal weights 1/n."""
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} entries for {n} models")
    return weights


def f32(x: jax.Array) -> jax.Array:
    """Merges compute in float32 whatever the parameter dtype."""
    return jnp.asarray(x, jnp.float32)


# ------------------------------------------------------------------------ compiled leaf programs


def is_traced(*trees) -> bool:
    """Whether any leaf of ``trees`` is a tracer (the caller runs inside ``jit``/``vmap``)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


class LeafProgram:
    """A merge operator's per-leaf work as one compiled program.

    ``program(*args, donate=False, **kwargs)`` runs ``fn`` as a ``jax.jit`` program: XLA fuses
    the whole chain (float32 casts, task vectors, reductions, the final cast) so an eager call
    reads every input once per pass and writes one output, where op-by-op dispatch writes a
    fresh leaf-sized array per op (on CPU mostly page faults). ``jax.jit`` caches one
    executable per (shapes, dtypes, static arguments); floats passed as arrays or Python
    scalars are traced, so new hyperparameter values reuse it. Under an outer transformation
    (any argument a tracer) ``fn`` is called directly and inlines into the caller's program.

    ``donate=True`` hands the buffers of the ``donate_argnums`` arguments to XLA, which writes
    the output into one of them (no fresh allocation); those arrays are deleted. Only for
    arrays the caller gives up: operators pass it on from their own ``donate`` argument or use
    it for temporaries they own. ``reduction=True`` marks a program dominated by a
    many-output float reduction: on CPU it compiles with ``host.reduction_compiler_options`` (XLA:CPU's
    classic emitter vectorises such reductions, the default one runs them as a scalar loop).
    """

    def __init__(self, fn, *, static_argnames=(), donate_argnums=(0,), reduction=False):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self._static = static_argnames
        self._donate_argnums = donate_argnums
        self._reduction = reduction
        self._jitted: dict = {}

    def _program(self, donate: bool, platform: str):
        key = (donate, platform)
        if key not in self._jitted:
            options = host.reduction_compiler_options(platform) if self._reduction else {}
            self._jitted[key] = jax.jit(
                self.fn, static_argnames=self._static, compiler_options=options or None,
                donate_argnums=self._donate_argnums if donate else ())
        return self._jitted[key]

    def __call__(self, *args, donate: bool = False, **kwargs):
        if is_traced(args, kwargs):
            return self.fn(*args, **kwargs)
        first = next((x for x in jax.tree.leaves(args) if isinstance(x, jax.Array)), None)
        platform = next(iter(first.devices())).platform if first is not None else "cpu"
        return self._program(donate, platform)(*args, **kwargs)


def leaf_program(fn=None, *, static_argnames=(), donate_argnums=(0,), reduction=False):
    """Decorator making ``fn`` a ``LeafProgram`` (usable bare or with arguments)."""
    if fn is None:
        return functools.partial(leaf_program, static_argnames=static_argnames,
                                 donate_argnums=donate_argnums, reduction=reduction)
    return LeafProgram(fn, static_argnames=static_argnames, donate_argnums=donate_argnums,
                       reduction=reduction)


def donatable(trees, donate: bool) -> Callable[[Any], bool]:
    """``owns(leaf)``: whether a leaf of ``trees`` may be donated. ``donate=False``: never
    (a user's arrays are never donated silently). ``donate=True``: any ``jax.Array`` that
    appears once across ``trees`` (a buffer passed twice, e.g. the base also given as a
    model or a tied embedding, cannot be donated twice and is kept)."""
    if not donate:
        return lambda leaf: False
    seen: dict[int, int] = {}
    for leaf in jax.tree.leaves(trees):
        seen[id(leaf)] = seen.get(id(leaf), 0) + 1
    return lambda leaf: (isinstance(leaf, jax.Array) and not is_traced(leaf)
                         and seen.get(id(leaf)) == 1)
