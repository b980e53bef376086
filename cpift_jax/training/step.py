"""The train step, compiled once per (model, optimizer settings, freeze pattern, mesh, batch
shape, step config) and reused by every stage and method.

Compile-once contract: ``train_step(...)`` returns a cached ``TrainStep`` whose jitted
functions depend only on that key. Everything that changes from stage to stage is data: the
parameters, the optimizer state (Adam moments, the freeze mask's arrays, the learning-rate
schedule's numbers and step count, see ``optim.make``) and the batch. Two stages of different
length, peak learning rate or warm-up, or with different freeze masks of one pattern
(``optim.freeze_pattern``), run the same executable.

Loss and gradient: with ``M`` micro-batches, ``L = sum_m NLL_m / max(1, sum_m N_m)`` and
``g = sum_m grad(NLL_m) / max(1, sum_m N_m)``, where ``NLL_m`` is the sum of the masked
next-token NLL of micro-batch ``m`` and ``N_m`` its number of supervised tokens: the same loss and
gradient as the whole batch at once (up to float32 rounding), whatever the token counts.
Micro-batch ``m`` holds rows ``m, m + M, m + 2M, ...``, so with the batch's rows split in
contiguous blocks over the devices every micro-batch stays spread over all of them.

Packed batches (``cpift_jax.data.packing``) carry ``segment_ids`` and ``positions`` besides
``tokens`` and ``loss_mask`` (both or neither): the forward attends within each document only and
rotates by the documents' own positions (``models.scan.hidden_states``); the packer masks each
document's first token, so the loss is the sum over documents of what each gives alone.
``train_step(..., packed=True)`` is its own compile key (its batch has the two extra arrays).

State layout: with ``scan_layers`` the state (parameters, Adam moments, freeze mask) holds the
*stacked* layout of ``models.scan`` (``model/layers/<leaf>`` with a leading ``[num_layers]``
axis), so the compiled step has the same number of leaves, and the same compile time, whatever
the depth; ``StateLayout.enter`` / ``leave`` convert from and to the storage layout
(``model/layers/{i}/...``) once per ``train()`` call. Without ``scan_layers`` both layouts are
the storage layout.

Shardings: parameters, Adam moments and the freeze mask from ``sharding.tree_shardings`` with
``LLAMA_RULES`` on the mesh (stacked leaves: the layer's sharding behind a replicated
``layers`` axis); the batch's rows over the mesh axes ``data`` and ``fsdp`` that the mesh has;
scalars replicated. The state argument is donated.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpift_jax import optim
from cpift_jax import sharding
from cpift_jax import tree as tree_lib
from cpift_jax.models import scan as scan_lib
from cpift_jax.models.config import ModelConfig
from cpift_jax.models.functional import abstract_params
from cpift_jax.training import loss as loss_lib

__all__ = ["StepConfig", "TrainState", "StateLayout", "TrainStep", "train_step", "state_layout",
           "loss_and_grads", "replicated_step", "batch_sharding", "BATCH_ROW_AXES", "BATCH_KEYS",
           "PACKED_KEYS", "clear_cache"]

Pytree = Any

# Mesh axes the batch's rows are split over (those the mesh has, in this order).
BATCH_ROW_AXES = ("data", "fsdp")
# A batch's arrays, all [rows, seq]; packed batches (data.packing) add PACKED_KEYS.
BATCH_KEYS = ("tokens", "loss_mask")
PACKED_KEYS = ("segment_ids", "positions")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """How the train step computes; the defaults are the plain step (full-batch gradient, no
    remat, a Python loop over layers, float32 compute, full logits).

    Attributes:
      micro_batches: gradient accumulation over this many micro-batches (``lax.scan``); the
        batch's rows must divide into them (and each micro-batch over the batch devices).
        Loss and gradient equal the full batch's (module docstring).
      remat: ``"none"`` (keep every activation), ``"layer"`` (``jax.checkpoint`` around each
        decoder layer, saving only its input) or ``"dots"`` (save the projections' outputs,
        ``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``); see
        ``models.scan.REMAT_POLICIES``.
      scan_layers: run the decoder layers with ``lax.scan`` over stacked weights, with the
        state kept in the stacked layout (module docstring), so compile time does not grow
        with depth.
      compute_dtype: ``"float32"`` or ``"bfloat16"``: parameters are cast for the forward and
        backward passes; master weights, gradients, optimizer state and the loss stay float32
        (for float32 parameters).
      vocab_chunk: vocabulary columns per cross-entropy chunk (``loss.chunked_nll``); 0 = one
        chunk (full ``[batch, seq, vocab]`` float32 logits).
    """

    micro_batches: int = 1
    remat: str = "none"
    scan_layers: bool = False
    compute_dtype: str = "float32"
    vocab_chunk: int = 0

    def __post_init__(self):
        for name in ("micro_batches", "vocab_chunk"):
            value = getattr(self, name)
            low = 1 if name == "micro_batches" else 0
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"step config '{name}' must be an int >= {low}, got {value!r}")
        if self.remat not in scan_lib.REMAT_POLICIES:
            raise ValueError(f"step config 'remat' must be one of "
                             f"{sorted(scan_lib.REMAT_POLICIES)}, got {self.remat!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"step config 'compute_dtype' must be one of {COMPUTE_DTYPES}, "
                             f"got {self.compute_dtype!r}")
        if not isinstance(self.scan_layers, (bool, np.bool_)):
            raise ValueError(f"step config 'scan_layers' must be a bool, got {self.scan_layers!r}")

    @classmethod
    def from_config(cls, config) -> StepConfig:
        """From a ConfigDict (or any object) with some of the fields; absent fields default."""
        if config is None or isinstance(config, StepConfig):
            return config or cls()
        names = [f.name for f in dataclasses.fields(cls)]
        given = dict(config) if isinstance(config, dict) else {
            k: v for k, v in (config.items() if hasattr(config, "items") else vars(config).items())}
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"step config has unknown fields {unknown}; known: {names}")
        return cls(**given)


class TrainState(NamedTuple):
    """What a run resumes from: parameters, optimizer state (moments, freeze mask, schedule
    numbers and count) and ``step``, the int32 number of steps taken."""

    params: Pytree
    opt_state: Pytree
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The train state on the mesh, for one (model, optimizer settings, freeze pattern, mesh,
    ``scan_layers``), and the small programs around it.

    Attributes:
      stacked: whether the state holds the stacked layer layout (``scan_layers``).
      abstract: the state as ``jax.ShapeDtypeStruct``s with their shardings (a restore
        target); ``shardings``: the ``NamedSharding``s alone; ``mask_shardings``: of the
        freeze mask's arrays in the state layout (None without a freeze mask).
      storage_shardings: of the parameters in the storage layout (what ``train()`` returns);
        ``storage_mask_shardings``: of the freeze mask's arrays in that layout.
      pattern: the freeze pattern in the state layout.
      init: ``(params, frozen_arrays, schedule_numbers) -> opt_state``, all in the state
        layout (``frozen_arrays`` from ``optim.split_freeze_mask``; None without a mask).
      enter: ``(params, frozen_arrays) -> (params, frozen_arrays)`` from the storage layout
        (placed on ``storage_shardings`` / its mask's) into fresh buffers of the state layout;
        None when the layouts are the same.
      leave: ``params -> params`` from the state layout to the storage layout on
        ``storage_shardings``; None when the layouts are the same.
    """

    stacked: bool
    abstract: TrainState
    shardings: TrainState
    mask_shardings: Pytree
    storage_shardings: Pytree
    storage_mask_shardings: Pytree
    pattern: tuple | None
    init: Any
    enter: Any
    leave: Any


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The compiled pieces of one key (see ``train_step``).

    ``step(state, batch) -> (state, metrics)``: ``state`` (in ``layout``) is donated;
    ``metrics`` are float32 scalars ``loss`` (masked mean NLL before the update),
    ``grad_norm`` (global norm of the gradient before clipping) and ``tokens`` (supervised
    tokens).
    """

    step: Any
    layout: StateLayout
    batch_shardings: dict

    @property
    def state_shardings(self) -> TrainState:
        return self.layout.shardings

    @property
    def init(self):
        return self.layout.init

    @property
    def mask_shardings(self) -> Pytree:
        return self.layout.mask_shardings


def replicated_step(step: int, sharding: NamedSharding) -> jax.Array:
    """The int32 step count as a ``jax.Array`` on ``sharding`` (replicated; built from a
    callback, so it works when the mesh spans several processes)."""
    return jax.make_array_from_callback((), sharding, lambda _: np.asarray(step, np.int32))


def batch_sharding(mesh: Mesh, rows: int, *, micro_batches: int = 1) -> NamedSharding:
    """Rows over the ``BATCH_ROW_AXES`` the mesh has; ValueError unless ``rows`` divides into
    ``micro_batches`` groups that each divide over those devices."""
    axes = tuple(a for a in BATCH_ROW_AXES if a in mesh.axis_names)
    devices = math.prod(dict(mesh.shape)[a] for a in axes)
    if rows % (devices * micro_batches):
        raise ValueError(
            f"batch of {rows} rows: need a multiple of {devices * micro_batches} "
            f"(mesh axes {axes} span {devices} devices, times {micro_batches} micro-batches)"
        )
    spec = PartitionSpec(axes if len(axes) > 1 else (axes[0] if axes else None), None)
    return NamedSharding(mesh, spec)


def _nll_sum(model_config: ModelConfig, step_config: StepConfig, prepared: Pytree,
             tokens: jax.Array, mask: jax.Array, row_sharding: NamedSharding | None,
             segment_ids: jax.Array | None = None, positions: jax.Array | None = None):
    params = scan_lib.cast_floating(prepared, step_config.compute_dtype)
    activations = None if row_sharding is None else NamedSharding(
        row_sharding.mesh, PartitionSpec(row_sharding.spec[0], None, None))
    packed = {} if segment_ids is None else {"segment_ids": segment_ids[:, :-1],
                                             "positions": positions[:, :-1]}
    hidden = scan_lib.hidden_states(model_config, params, tokens[:, :-1],
                                    scan=step_config.scan_layers, remat=step_config.remat,
                                    compute_dtype=step_config.compute_dtype,
                                    activation_sharding=activations, **packed)
    kernel = scan_lib.head_kernel(model_config, params)
    return loss_lib.chunked_nll(hidden, kernel, tokens[:, 1:], mask[:, 1:],
                                step_config.vocab_chunk,
                                softcap_at=model_config.final_logit_softcapping)


def loss_and_grads(model_config: ModelConfig, step_config: StepConfig, params: Pytree,
                   batch: dict, row_sharding: NamedSharding | None = None):
    """``(loss, tokens, grads)`` of one batch, traceable (module docstring for the maths).
    ``params`` are in the state layout (stacked with ``scan_layers``, ``models.scan``);
    ``grads`` has their layout and dtypes. ``row_sharding``: the batch's sharding, kept on each
    micro-batch's rows. ``batch``: ``tokens`` and ``loss_mask``, and for packed rows
    ``segment_ids`` and ``positions`` too (``PACKED_KEYS``)."""
    prepared = params
    value_and_grad = jax.value_and_grad(
        lambda p, *arrays: _nll_sum(model_config, step_config, p, *arrays[:2], row_sharding,
                                    *arrays[2:]),
        has_aux=True)
    arrays = tuple(batch[k] for k in _batch_keys(batch))
    micro = step_config.micro_batches
    if micro == 1:
        (nll, count), grads = value_and_grad(prepared, *arrays)
    else:
        def split(x):
            rows = x.shape[0]
            x = x.reshape(rows // micro, micro, *x.shape[1:]).swapaxes(0, 1)
            if row_sharding is not None:
                spec = PartitionSpec(None, *row_sharding.spec)
                x = jax.lax.with_sharding_constraint(x, NamedSharding(row_sharding.mesh, spec))
            return x

        def accumulate(carry, xs):
            nll_sum, count_sum, grad_sum = carry
            (nll, count), grads = value_and_grad(prepared, *xs)
            grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
            return (nll_sum + nll, count_sum + count, grad_sum), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), prepared)
        init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        (nll, count, grads), _ = jax.lax.scan(accumulate, init, tuple(map(split, arrays)))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, prepared)
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: (g / denominator).astype(g.dtype), grads)
    return nll / denominator, count, grads


def _batch_keys(batch: dict) -> tuple[str, ...]:
    """``BATCH_KEYS``, plus ``PACKED_KEYS`` when the batch is packed; ValueError on any other
    key set (half a packed batch would silently attend across documents)."""
    keys = set(batch)
    if keys == set(BATCH_KEYS):
        return BATCH_KEYS
    if keys == set(BATCH_KEYS + PACKED_KEYS):
        return BATCH_KEYS + PACKED_KEYS
    raise ValueError(f"a batch has keys {BATCH_KEYS} and optionally all of {PACKED_KEYS}, "
                     f"got {sorted(keys)}")


def _abstract_mask(params: Pytree, pattern: tuple | None) -> Pytree | None:
    """``split_freeze_mask``'s arrays for ``pattern``, as ``jax.ShapeDtypeStruct``s."""
    if pattern is None:
        return None
    kinds = dict(pattern)
    paths, leaves, treedef = tree_lib.flatten(params)
    return jax.tree_util.tree_unflatten(treedef, [
        jax.ShapeDtypeStruct(leaf.shape, jnp.bool_) if kinds.get(path) == "array" else None
        for path, leaf in zip(paths, leaves)
    ])


def _with_shardings(abstract: Pytree, shardings: Pytree) -> Pytree:
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        abstract, shardings)


def _build_layout(model_config, optimizer_config, storage_pattern, mesh, stacked) -> StateLayout:
    storage_abstract = abstract_params(model_config)
    if stacked:
        params_abstract = jax.eval_shape(scan_lib.stack_layers, storage_abstract)
        pattern = scan_lib.stack_freeze_pattern(storage_pattern, params_abstract)
    else:
        params_abstract, pattern = storage_abstract, storage_pattern
    mask_abstract = _abstract_mask(params_abstract, pattern)

    def init(params, frozen_arrays, schedule):
        frozen = None if pattern is None else optim.join_freeze_mask(pattern, frozen_arrays)
        tx = optim.make(optimizer_config, frozen, schedule=optim.ScheduleNumbers(*schedule))
        return tx.init(params)

    numbers_abstract = optim.ScheduleNumbers(*[jax.ShapeDtypeStruct((), jnp.float32)] * 4)
    opt_abstract = jax.eval_shape(init, params_abstract, mask_abstract, numbers_abstract)
    rules = sharding.LLAMA_RULES
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = TrainState(params=sharding.tree_shardings(params_abstract, rules, mesh),
                          opt_state=sharding.tree_shardings(opt_abstract, rules, mesh),
                          step=replicated)
    abstract = _with_shardings(
        TrainState(params_abstract, opt_abstract, jax.ShapeDtypeStruct((), jnp.int32)), state_sh)

    def mask_shardings(masks):
        return None if masks is None else sharding.tree_shardings(masks, rules, mesh)

    mask_sh = mask_shardings(mask_abstract)
    storage_sh = sharding.tree_shardings(storage_abstract, rules, mesh)
    storage_mask_sh = mask_shardings(_abstract_mask(storage_abstract, storage_pattern))
    jitted_init = jax.jit(init, in_shardings=(state_sh.params, mask_sh, replicated),
                          out_shardings=state_sh.opt_state)
    enter = leave = None
    if stacked:
        def stack(params, frozen_arrays):
            arrays = None if frozen_arrays is None else scan_lib.stack_freeze_arrays(
                storage_pattern, frozen_arrays, params)
            return scan_lib.stack_layers(params), arrays

        enter = jax.jit(stack, in_shardings=(storage_sh, storage_mask_sh),
                        out_shardings=(state_sh.params, mask_sh))
        leave = jax.jit(scan_lib.unstack_layers, in_shardings=(state_sh.params,),
                        out_shardings=storage_sh)
    return StateLayout(stacked=stacked, abstract=abstract, shardings=state_sh,
                       mask_shardings=mask_sh, storage_shardings=storage_sh,
                       storage_mask_shardings=storage_mask_sh, pattern=pattern,
                       init=jitted_init, enter=enter, leave=leave)


def _build(layout: StateLayout, model_config, optimizer_config, mesh, batch_shape,
           step_config, packed) -> TrainStep:
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = layout.shardings
    rows = batch_sharding(mesh, batch_shape[0], micro_batches=step_config.micro_batches)
    batch_sh = {k: rows for k in BATCH_KEYS + (PACKED_KEYS if packed else ())}
    # The update's code depends on the optimizer's settings and the freeze pattern only; the
    # mask's arrays and the schedule's numbers are read from the state.
    mask_abstract = _abstract_mask(layout.abstract.params, layout.pattern)
    frozen = None if layout.pattern is None else optim.join_freeze_mask(layout.pattern,
                                                                          mask_abstract)
    tx = optim.make(optimizer_config, frozen)

    def step(state: TrainState, batch: dict):
        loss, count, grads = loss_and_grads(model_config, step_config, state.params, batch, rows)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": count}
        return TrainState(params, opt_state, state.step + 1), metrics

    metric_sh = {"loss": replicated, "grad_norm": replicated, "tokens": replicated}
    jitted_step = jax.jit(step, in_shardings=(state_sh, batch_sh),
                          out_shardings=(state_sh, metric_sh), donate_argnums=0)
    return TrainStep(step=jitted_step, layout=layout, batch_shardings=batch_sh)


_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 16


def _cached(key, build):
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    built = build()
    _CACHE[key] = built
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return built


def state_layout(model_config: ModelConfig, optimizer_config, mesh: Mesh,
                 step_config: StepConfig | None = None,
                 freeze_pattern: tuple | None = None) -> StateLayout:
    """The ``StateLayout`` for this key (arguments as for ``train_step``; of ``step_config``
    only ``scan_layers`` matters), built on first use and cached. Needs no batch: a resumed
    run restores its state onto ``layout.abstract`` before it reads a batch."""
    step_config = StepConfig() if step_config is None else step_config
    stacked = bool(step_config.scan_layers)
    key = ("layout", model_config, optim.compile_key(optimizer_config), freeze_pattern, mesh,
           stacked)
    return _cached(key, lambda: _build_layout(model_config, optimizer_config, freeze_pattern,
                                              mesh, stacked))


def train_step(model_config: ModelConfig, optimizer_config, mesh: Mesh,
               batch_shape: tuple[int, int], step_config: StepConfig | None = None,
               freeze_pattern: tuple | None = None, *, packed: bool = False) -> TrainStep:
    """The ``TrainStep`` for this key, built on first use and cached (least recently used of
    the last 16 steps and layouts kept).

    Args:
      model_config: the model (hashable).
      optimizer_config: as for ``optim.make``; only ``optim.compile_key(optimizer_config)`` is
        part of the key (the schedule's numbers are state).
      mesh: the device mesh; batch_shape: ``(rows, seq_len)`` of every batch.
      step_config: ``StepConfig`` (None: defaults).
      freeze_pattern: ``optim.freeze_pattern(frozen)`` of the mask in the storage layout;
        None: nothing frozen.
      packed: the batches carry ``segment_ids`` and ``positions`` (``data.packing``); the
        step's ``batch_shardings`` then has those keys too.
    """
    step_config = StepConfig() if step_config is None else step_config
    batch_shape = tuple(int(n) for n in batch_shape)
    packed = bool(packed)
    key = ("step", model_config, optim.compile_key(optimizer_config), freeze_pattern, mesh,
           batch_shape, step_config, packed)
    layout = state_layout(model_config, optimizer_config, mesh, step_config, freeze_pattern)
    return _cached(key, lambda: _build(layout, model_config, optimizer_config, mesh, batch_shape,
                                       step_config, packed))


def clear_cache() -> None:
    """Forgets every cached ``TrainStep`` and ``StateLayout`` (their executables go with them)."""
    _CACHE.clear()
