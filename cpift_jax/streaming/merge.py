"""Streaming merge of whole checkpoints, one tensor name at a time (models bigger than memory).

    result = streaming.merge_checkpoints(
        ["ckpt/a", "ckpt/b"], "out/merged", operator="ties", base="ckpt/base",
        params={"density": 0.5}, rules=[(r".*self_attn.*", {"density": 0.3})])

For every tensor name, in the reference checkpoint's storage order: read that tensor from each
model (and the base), merge it with ``cpift_jax.merges.get(operator)`` applied to one-leaf
pytrees, append the result to the current output shard, drop every reference; the next
tensor's inputs are read, and the previous result written, in background threads meanwhile.
Peak memory is about 2 x (number of models + 2) times the largest tensor, plus the operator's
float32 temporaries and a few written outputs per distinct tensor shape kept for reuse,
whatever the model size: inputs are ``pread`` (nothing memory-mapped) into two reused sets of
aligned host buffers (one merged, one read ahead) that XLA reads in place, results are computed
into the buffers of earlier, already written results (``cpift_jax.streaming.host_buffers``: no page
faults after the first tensors), and shards are written as their tensors arrive
(``cpift_jax.models.safetensors_io``), so not even one shard is held.

Inputs: Hugging Face directories or Orbax parameter checkpoints (``cpift_jax.streaming.checkpoint_io``).
Output: a Hugging Face directory with ``config.json`` (from the base, else the first model that
has one; ``vocab_size`` and dtype updated), ``model-0000i-of-0000n.safetensors`` shards of at most
``max_shard_size`` plus ``model.safetensors.index.json``, the tokenizer files of the same
checkpoint, and ``merge_config.json`` recording the recipe. Everything is written into
``<output>.tmp-XXXX`` next to ``output`` and renamed into place only when complete, so a failure
leaves no output directory. Shards are written with ``O_DIRECT`` where the filesystem allows it
(``direct_write``, ``cpift_jax.streaming.direct_write``).

Execution: ``"jit"`` compiles the operator once per (input shapes, dtypes, hyperparameters) and
reuses it across tensors (layers share shapes). ``"eager"`` calls it op by op
(each jnp op is itself compiled once per shape; operators may take NumPy fast paths on concrete
arrays). ``"auto"`` (default) picks eager for stochastic operators (they take a per-tensor
Python-int seed, which would recompile every tensor under jit), jit for the rest, and falls back
to eager with a warning if an operator cannot be traced. Under jit, float hyperparameters are
traced scalars (a layer gradient compiles once per shape) unless the operator needs them as
Python numbers, which is found out once by tracing and logged; the output is computed into a
donated, already written buffer of the same shape and dtype (an operator returning another shape
or dtype is logged and computed into fresh memory). Nothing else is caught: any other error
fails the merge.
Stochastic operators get ``seed = crc32("<seed>:<tensor name>")`` per tensor, so every tensor
draws its own mask and the result is reproducible from ``params.seed``. Per-tensor merging means
``scope="global"`` (ranking the whole task vector at once) cannot stream and is refused.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cpift_jax import merges
from cpift_jax.streaming import plan as plan_lib
from cpift_jax.streaming import checkpoint_io as ckpt_lib
from cpift_jax.streaming import host_buffers
from cpift_jax.models import safetensors_io as st
from cpift_jax.streaming.direct_write import SequentialWriter

__all__ = ["MergeResult", "TensorMerger", "merge_checkpoints", "merge_from_config", "EXECUTIONS"]

EXECUTIONS = ("auto", "jit", "eager")
# Written outputs queued behind the one being written: the disk rarely waits for the merge, at
# the cost of holding that many more outputs in memory.
_WRITES_IN_FLIGHT = 2
# Tensors read ahead of the one being merged (plus it: the staging slots). Two ahead measured
# within the run-to-run noise of bench_merge while holding 50% more staging memory.
_READ_AHEAD = 1
_SLOTS = _READ_AHEAD + 1
DEFAULT_MAX_SHARD_SIZE = "2GB"
_TRACE_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerBoolConversionError,
)


@dataclasses.dataclass(frozen=True)
class MergeResult:
    output: str
    num_tensors: int
    total_bytes: int
    num_shards: int
    seconds: float
    compilations: int
    execution: str
    copied_files: tuple[str, ...]


def _operator_call(merge_fn, hp: Mapping[str, Any], cast, stored, inputs, base, traced_hp=None):
    """The operator on one tensor: one-leaf pytrees in, the merged array out. ``stored`` gives,
    for each input then the base, the true dtype of inputs passed as raw bits (or None)."""
    if traced_hp:
        hp = {**hp, **traced_hp}
    inputs = [host_buffers.from_storage(x, d) for x, d in zip(inputs, stored)]
    if base is not None:
        base = host_buffers.from_storage(base, stored[len(inputs)])
    if cast is not None:
        inputs = [x.astype(cast) for x in inputs]
        base = None if base is None else base.astype(cast)
    out = merge_fn([{"w": x} for x in inputs], base=None if base is None else {"w": base}, **hp)
    return out["w"]


def _true_dtypes(stored) -> tuple:
    """``stored`` as a hashable tuple of numpy dtypes or None (part of a program's cache key)."""
    return tuple(None if d is None else np.dtype(d) for d in stored)


def _traced_floats(hp: Mapping[str, Any]) -> dict:
    """The float hyperparameters, passed to a program as traced scalars."""
    return {k: v for k, v in hp.items() if isinstance(v, float)}


def _signature(key: tuple, inputs) -> tuple:
    """One compiled program: its cache key plus the input shapes and dtypes."""
    return key + tuple((x.shape, str(x.dtype)) for x in inputs)


def _operator_call_into(merge_fn, hp, cast, stored, spare, inputs, base, traced_hp):
    """``_operator_call`` with a donated, unused ``spare`` output-sized array: XLA writes the
    result into its buffer (memory already paged in) instead of a fresh allocation."""
    del spare
    return _operator_call(merge_fn, hp, cast, stored, inputs, base, traced_hp)


class TensorMerger:
    """Applies one operator tensor by tensor, compiling once per distinct call signature.

    Inputs are jax arrays (possibly zero-copy views of host buffers, see
    ``cpift_jax.streaming.host_buffers``), so they are never donated; instead outputs handed back with
    ``recycle`` once written are donated as the buffer of a later output of the same shape.
    """

    def __init__(self, operator: str, execution: str = "auto"):
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
        self.operator = operator
        self.module = merges.get_module(operator)
        self.merge_fn = self.module.merge
        self.stochastic = bool(getattr(self.module, "STOCHASTIC", False))
        if execution == "auto":
            execution = "eager" if self.stochastic else "jit"
        self.execution = execution
        self._jitted: dict[tuple, Any] = {}
        self._lock = threading.Lock()  # the compile-ahead thread creates programs too
        self._ahead: dict[tuple, concurrent.futures.Future] = {}
        self._ahead_pool = None
        self._signatures: set[tuple] = set()
        self._spares = host_buffers.SparePool(per_shape=_WRITES_IN_FLIGHT + 1)
        # Float hyperparameters go in as traced scalars, so a layer gradient of t compiles once
        # per shape instead of once per layer; operators that need them as Python numbers (a
        # top-k count from a density) get them compiled in, one program per value. Decided once
        # per set of float names (``_traces_floats``).
        self._float_tracing: dict[tuple[str, ...], bool] = {}
        # Program signature -> whether its output can take a donated spare (``_donates``).
        self._donation: dict[tuple, bool] = {}

    @property
    def compilations(self) -> int:
        """Distinct (hyperparameters, shapes, dtypes) the jitted operator was called with."""
        return len(self._signatures)

    def __call__(self, inputs: list, base, hp: Mapping[str, Any], cast=None) -> np.ndarray:
        """Merged tensor as a numpy array; ``inputs``/``base`` are numpy or jax arrays."""
        return np.asarray(self.merge([jnp.asarray(x) for x in inputs],
                                     None if base is None else jnp.asarray(base), hp, cast))

    def merge(self, inputs: list, base, hp: Mapping[str, Any], cast=None,
              stored: Sequence | None = None, name: str | None = None) -> jax.Array:
        """Merged tensor; ``inputs``/``base`` are jax arrays, ``stored`` their true dtypes when
        they hold raw bits (``host_buffers.to_jax``), one per input then the base. ``name``
        (the tensor's) only labels log messages."""
        stored = _true_dtypes(stored if stored is not None else (None,) * (len(inputs) + 1))
        if self.execution == "jit":
            try:
                return self._jit_call(inputs, base, hp, cast, stored, name)
            except _TRACE_ERRORS as err:  # the operator needs concrete arrays
                logging.warning("operator %r cannot be traced by jax.jit (%s at tensor %r); "
                                "running it eagerly from now on", self.operator,
                                type(err).__name__, name)
                self.execution = "eager"
        return _operator_call(self.merge_fn, hp, cast, stored, inputs, base)

    def recycle(self, output: jax.Array) -> None:
        """Hands back a result of ``merge`` that is written and has no live NumPy view."""
        if self.execution == "jit":
            self._spares.put(output)

    def _jit_call(self, inputs, base, hp, cast, stored, name):
        traced = self._traced(inputs, base, hp, cast, stored, name)
        return self._jit_call_split(inputs, base, hp, traced, cast, stored, name)

    def _traced(self, inputs, base, hp, cast, stored, name) -> dict:
        """The hyperparameters of ``hp`` to pass as traced scalars: its floats, unless the
        operator needs them as Python numbers (``_traces_floats``)."""
        traced = _traced_floats(hp)
        if traced and not self._traces_floats(inputs, base, hp, traced, cast, stored, name):
            return {}
        return traced

    def _traces_floats(self, inputs, base, hp, traced, cast, stored, name) -> bool:
        """Whether the operator takes the float hyperparameters ``traced`` as traced scalars.

        Decided once per set of their names by tracing on abstract values (nothing is
        computed). The call with every value compiled in is traced first, so a genuine error
        raises here as it would in the merge; if that traces and the call with traced floats
        raises, tracing them is the only difference and so the cause (typically an operator
        that checks ``isinstance(density, float)`` or derives a top-k count from it). Logged."""
        def decide() -> bool:
            jax.eval_shape(functools.partial(_operator_call, self.merge_fn, hp, cast, stored),
                           list(inputs), base)
            try:
                self._trace(inputs, base, hp, traced, cast, stored)
                return True
            except (TypeError, ValueError, *_TRACE_ERRORS) as err:
                logging.warning("operator %r needs %s as Python numbers, not traced scalars (at "
                                "tensor %r: %s: %s); compiling one program per value",
                                self.operator, ", ".join(sorted(traced)), name,
                                type(err).__name__, err)
                return False

        return self._remembered(self._float_tracing, tuple(sorted(traced)), decide)

    def _donates(self, signature, inputs, base, hp, traced, cast, stored, name) -> bool:
        """Whether the program's output has the shape and dtype of the spare it is given, so XLA
        writes it into that donated buffer. Checked once per signature by tracing (nothing is
        computed); an operator returning another shape or dtype is logged and gets a program
        without donation (JAX would otherwise warn and free the spare)."""
        def decide() -> bool:
            out = self._trace(inputs, base, hp, traced, cast, stored)
            want = (tuple(inputs[0].shape), self._out_dtype(inputs, cast, stored))
            ok = (tuple(out.shape), np.dtype(out.dtype)) == want
            if not ok:
                logging.warning("operator %r returns %s%s for tensor %r, not its inputs' %s%s; "
                                "its outputs go to fresh memory instead of a reused buffer",
                                self.operator, np.dtype(out.dtype), list(out.shape), name,
                                want[1], list(want[0]))
            return ok

        return self._remembered(self._donation, signature, decide)

    def _trace(self, inputs, base, hp, traced, cast, stored):
        """The operator's output shape and dtype with the ``traced`` floats as abstract scalars
        (nothing is computed)."""
        static = {k: v for k, v in hp.items() if k not in traced}
        values = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in traced}
        return jax.eval_shape(functools.partial(_operator_call, self.merge_fn, static, cast,
                                                stored), list(inputs), base, values)

    def _remembered(self, table: dict, key, decide):
        """``table[key]``, computed by ``decide()`` the first time (outside the lock: tracing
        takes a while, and two threads deciding the same key agree)."""
        with self._lock:
            known = table.get(key)
        if known is not None:
            return known
        value = decide()
        with self._lock:
            table[key] = value
        return value

    @staticmethod
    def _key(hp, traced, cast, stored) -> tuple:
        """A program's cache key: its compiled-in hyperparameters, traced names and dtypes."""
        static = {k: v for k, v in hp.items() if k not in traced}
        return (tuple(sorted(static.items())), tuple(sorted(traced)),
                None if cast is None else np.dtype(cast).name, stored)

    def _program(self, hp, traced, cast, stored, donate: bool):
        """The jitted program for these hyperparameters and dtypes: ``fn(spare, inputs, base,
        values)`` computing into the donated ``spare``, or without donation
        ``fn(inputs, base, values)``."""
        static = {k: v for k, v in hp.items() if k not in traced}
        key = (self._key(hp, traced, cast, stored), donate)
        with self._lock:
            fn = self._jitted.get(key)
            if fn is None:
                if donate:
                    fn = jax.jit(functools.partial(_operator_call_into, self.merge_fn, static,
                                                   cast, stored),
                                 donate_argnums=(0,), keep_unused=True)
                else:
                    fn = jax.jit(functools.partial(_operator_call, self.merge_fn, static, cast,
                                                   stored))
                self._jitted[key] = fn
        return fn

    @staticmethod
    def _out_dtype(inputs, cast, stored):
        # Operators return the inputs' shape and dtype; a spare of that shape becomes the output.
        return np.dtype(cast if cast is not None else (stored[0] or inputs[0].dtype))

    def compile_ahead(self, calls) -> None:
        """Starts compiling, in a background thread and in order, the programs that ``merge``
        will need for ``calls``: ``(input shapes/dtypes, base or None, hp, cast, stored)``
        with ``jax.ShapeDtypeStruct`` placeholders as passed to ``merge``. Compilation then
        overlaps the first reads instead of stalling the stream; ``merge`` waits for a program
        being compiled ahead rather than compiling it twice. An operator that cannot be traced
        at all is left to ``merge`` (which runs it eagerly)."""
        if self.execution != "jit":
            return
        self._ahead_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile")
        for inputs, base, hp, cast, stored in calls:
            stored = _true_dtypes(stored)
            try:
                traced = self._traced(inputs, base, hp, cast, stored, None)
                signature = _signature(self._key(hp, traced, cast, stored), inputs)
                if signature in self._ahead:
                    continue
                donate = self._donates(signature, inputs, base, hp, traced, cast, stored, None)
            except _TRACE_ERRORS:
                return
            fn = self._program(hp, traced, cast, stored, donate)
            values = {k: jax.ShapeDtypeStruct((), jnp.float32) for k in traced}
            args = (list(inputs), base, values)
            if donate:
                spare = jax.ShapeDtypeStruct(inputs[0].shape, self._out_dtype(inputs, cast, stored),
                                             sharding=inputs[0].sharding)
                args = (spare, *args)
            self._ahead[signature] = self._ahead_pool.submit(
                lambda fn=fn, args=args: fn.lower(*args).compile())

    def close(self) -> None:
        """Stops compiling ahead (programs not started are dropped)."""
        if self._ahead_pool is not None:
            self._ahead_pool.shutdown(wait=True, cancel_futures=True)
            self._ahead_pool = None

    def _jit_call_split(self, inputs, base, hp, traced, cast, stored, name):
        signature = _signature(self._key(hp, traced, cast, stored), inputs)
        donate = self._donates(signature, inputs, base, hp, traced, cast, stored, name)
        fn = self._program(hp, traced, cast, stored, donate)
        ahead = self._ahead.pop(signature, None)
        if ahead is not None:
            concurrent.futures.wait([ahead])  # its errors resurface in the call below
        self._signatures.add(signature)
        values = {k: np.float32(v) for k, v in traced.items()}
        if not donate:
            return fn(list(inputs), base, values)
        # Without a spare a zero array stands in (one compiled program per shape, not two).
        out_dtype = self._out_dtype(inputs, cast, stored)
        spare = self._spares.take(inputs[0].shape, out_dtype)
        if spare is None:
            spare = jnp.zeros(inputs[0].shape, out_dtype, device=inputs[0].sharding)
        return fn(spare, list(inputs), base, values)


def tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed of a stochastic operator: every tensor draws its own randomness."""
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


def _check_output(output: str, overwrite: bool, inputs: Sequence[str]) -> str:
    output = os.path.abspath(output)
    for path in inputs:
        if os.path.abspath(path) == output:
            raise ValueError(f"output {output} is also an input checkpoint")
    if os.path.exists(output):
        if not os.path.isdir(output):
            raise FileExistsError(f"output {output} exists and is not a directory")
        if os.listdir(output) and not overwrite:
            raise FileExistsError(f"output directory {output} is not empty; set overwrite=True "
                                  "to replace it")
    return output


def _move_into_place(tmp: str, output: str) -> None:
    old = None
    if os.path.exists(output):
        old = tempfile.mkdtemp(prefix=os.path.basename(output) + ".old-",
                               dir=os.path.dirname(output))
        os.replace(output, os.path.join(old, "previous"))
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old)


def _config_source(models, base):
    for source in ([base] if base is not None else []) + list(models):
        if source.config is not None:
            return source
    raise ValueError("no input checkpoint has a config.json (Orbax checkpoints have none); "
                     "give at least one Hugging Face directory, preferably as base")


def _output_config(config: dict, vocab_rows: int | None, dtype) -> dict:
    config = dict(config)
    if vocab_rows is not None:
        config["vocab_size"] = vocab_rows
    if dtype is not None:
        # transformers 5 writes "dtype", older versions "torch_dtype": update what is there.
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
        for key in keys:
            config[key] = np.dtype(dtype).name
    return config


def merge_checkpoints(
    models: Sequence[str],
    output: str,
    *,
    operator: str,
    base: str | None = None,
    params: Mapping[str, Any] | None = None,
    rules: Sequence[tuple[str, Mapping[str, Any]]] = (),
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    truncate_vocab: bool = False,
    overwrite: bool = False,
    execution: str = "auto",
    direct_write: bool = True,
    progress: bool = True,
) -> MergeResult:
    """Merges checkpoint directories into a new Hugging Face directory (module docstring)."""
    start = time.perf_counter()
    models, base = list(models), base or None
    if isinstance(models, str) or not models:
        raise ValueError("models must be a non-empty list of checkpoint directories")
    merger = TensorMerger(operator, execution)
    ok, reason = merges.applicable(operator, len(models), base is not None)
    if not ok:
        raise ValueError(f"operator {operator!r} does not apply: {reason}")
    # None stands for the operator's own default (recipes list every key, see configs/merge).
    params = {k: v for k, v in dict(params or {}).items() if v is not None}
    if merger.stochastic:
        params.setdefault("seed", 0)
    plan_lib.check_hparam_names(operator, merger.merge_fn,
                                list(params) + [k for _, r in rules for k in r])
    max_shard_bytes = st.parse_size(max_shard_size)
    cast = None if not dtype else np.dtype(jnp.dtype(dtype))
    output = _check_output(output, overwrite, models + ([base] if base else []))

    sources = [ckpt_lib.open_checkpoint(p) for p in models]
    base_source = ckpt_lib.open_checkpoint(base) if base else None
    try:
        plans, vocab_rows = plan_lib.plan_tensors(
            sources, base_source, dtype=cast, truncate_vocab=truncate_vocab)
        config_source = _config_source(sources, base_source)
        names = [p.name for p in plans]
        hps = plan_lib.tensor_hparams(
            names, params, rules, num_layers=config_source.config.get("num_hidden_layers"))
        if merger.stochastic:
            for name in names:
                hps[name]["seed"] = tensor_seed(int(hps[name]["seed"]), name)
        _dry_run(merger, plans, hps, len(sources), base_source is not None, cast)
        shards = st.plan_shards([p.out for p in plans], max_shard_bytes)
        logging.info("merging %d tensors (%.3f GB) from %d models with %r (%s) into %d shards",
                     len(plans), sum(p.out.nbytes for p in plans) / 1e9, len(sources), operator,
                     merger.execution, len(shards))

        parent = os.path.dirname(output)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=os.path.basename(output) + ".tmp-", dir=parent)
        writer = st.ShardedWriter(
            tmp, shards, open_file=functools.partial(SequentialWriter, direct=direct_write))
        try:
            _stream(merger, plans, hps, sources, base_source, cast, writer, progress)
            writer.finish()
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(_output_config(config_source.config, vocab_rows, cast), f, indent=2)
            copied = tuple(ckpt_lib.copy_side_files(config_source.path, tmp))
            recipe = {"operator": operator, "models": models, "base": base, "params": params,
                      "rules": [[p, dict(v)] for p, v in rules], "dtype": dtype,
                      "truncate_vocab": truncate_vocab}
            with open(os.path.join(tmp, "merge_config.json"), "w") as f:
                json.dump(recipe, f, indent=2, default=list)
            _move_into_place(tmp, output)
        except BaseException:
            writer.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        for source in sources + ([base_source] if base_source else []):
            source.close()
    return MergeResult(output, len(plans), writer.total_size, len(shards),
                       time.perf_counter() - start, merger.compilations, merger.execution, copied)


def _dry_run(merger, plans, hps, n_models, has_base, cast) -> None:
    """Traces the operator on tiny arrays once per distinct hyperparameter set, so that a bad
    value in a rule that only matches late tensors fails now, naming the first tensor.

    ``jax.eval_shape`` runs every Python-level check without computing anything (eager runs
    of a per-layer gradient's ~40 distinct sets cost ~2 s); operators that need concrete
    arrays are run eagerly instead."""
    seen = set()
    # An operator whose *default* scope is global (cpi) must be refused too, not run per tensor.
    scope = inspect.signature(merger.merge_fn).parameters.get("scope")
    default_scope = None if scope is None else scope.default
    for plan in plans:
        hp = hps[plan.name]
        if hp.get("scope", default_scope) == "global":
            raise ValueError(f"tensor '{plan.name}': scope='global' ranks the whole model at "
                             "once and cannot stream tensor by tensor; use scope='leaf'")
        key = (tuple(sorted(hp.items())), len(plan.out.shape), plan.mergeable)
        if not plan.mergeable or key in seen:
            continue
        seen.add(key)
        dtype = plan.out.dtype
        rng = np.random.default_rng(0)
        shape = (2,) * len(plan.out.shape)
        inputs = [rng.normal(size=shape).astype(dtype) for _ in range(n_models)]
        base = rng.normal(size=shape).astype(dtype) if has_base else None
        call = functools.partial(_operator_call, merger.merge_fn, hp, None, (None,) * (n_models + 1))
        inputs = [jnp.asarray(x) for x in inputs]
        base = None if base is None else jnp.asarray(base)
        try:
            try:
                jax.eval_shape(call, inputs, base)
            except _TRACE_ERRORS:
                call(inputs, base)
        except (ValueError, TypeError) as err:
            raise ValueError(f"operator {merger.operator!r} rejects the hyperparameters of tensor "
                             f"'{plan.name}' ({dict(hp)}): {err}") from err


def _stream(merger, plans, hps, sources, base_source, cast, writer, progress) -> None:
    total = sum(p.out.nbytes for p in plans)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
               desc="merging", dynamic_ncols=True)
    readers = sources + ([base_source] if base_source is not None else [])
    # Slots for the tensor being merged and the ones being read ahead. Sources that cannot read
    # in place (Orbax) get no buffers.
    staging = host_buffers.Staging([
        max((r.specs[p.name].nbytes for p in plans), default=0) if r.reads_into_buffer else 0
        for r in readers], slots=_SLOTS)

    def load(index, slot):
        plan = plans[index]
        if index + 1 < len(plans):  # the kernel reads the tensor after this one meanwhile
            for reader in readers:
                reader.will_need(plans[index + 1].name)

        def read(k):
            buffer = staging.buffer(slot, k) if readers[k].reads_into_buffer else None
            array = readers[k].read(plan.name, buffer)
            return array if plan.rows is None else array[: plan.rows]

        # One thread per input: a read from the page cache is a CPU-bound copy in the kernel,
        # so the inputs' copies proceed side by side on the cores the merge leaves free.
        return list(read_pool.map(read, range(len(readers))))

    merger.compile_ahead(_expected_calls(plans, hps, sources, readers, cast))

    def write(name, box):
        array = box.pop()  # the only reference, dropped on return: the output can be recycled
        writer.write(name, array)

    # The next tensor is read, and earlier ones written, while this one merges: reads are
    # positional (pread), and file I/O and XLA release the GIL, so disk and compute overlap.
    # This holds _READ_AHEAD more sets of inputs and up to _WRITES_IN_FLIGHT outputs in memory.
    try:
        executor = concurrent.futures.ThreadPoolExecutor
        with bar, executor(1, thread_name_prefix="prefetch") as pool, \
                executor(len(readers), thread_name_prefix="read") as read_pool, \
                executor(1, thread_name_prefix="write") as write_pool:
            # Reads run _READ_AHEAD tensors ahead of the merge, each in its own staging slot.
            pending = collections.deque(pool.submit(load, k, k % _SLOTS)
                                        for k in range(min(_READ_AHEAD, len(plans))))
            writes = collections.deque()  # (future, output to recycle once written)
            # Where the main thread waits tells which stage bounds the merge (logged at the end).
            waits = {"reads": 0.0, "merge": 0.0, "writes": 0.0}
            clock = time.perf_counter
            for i, plan in enumerate(plans):
                tick = clock()
                arrays = pending.popleft().result()
                waits["reads"] += clock() - tick
                tick = clock()
                ahead = i + _READ_AHEAD
                if ahead < len(plans):
                    pending.append(pool.submit(load, ahead, ahead % _SLOTS))
                merged, out = _merge_tensor(merger, plan, arrays, hps[plan.name], cast, sources,
                                            base_source, staging)
                del arrays
                waits["merge"] += clock() - tick
                while len(writes) >= _WRITES_IN_FLIGHT:  # bounded memory; one writer keeps order
                    tick = clock()
                    done, written = writes.popleft()
                    done.result()
                    waits["writes"] += clock() - tick
                    if written is not None:
                        merger.recycle(written)
                writes.append((write_pool.submit(write, plan.name, [merged]), out))
                del merged, out
                bar.update(plan.out.nbytes)
                bar.set_postfix_str(f"{i + 1}/{len(plans)} tensors", refresh=False)
            tick = clock()
            for done, _ in writes:
                done.result()
            waits["writes"] += clock() - tick
    finally:
        merger.close()
    logging.info("main thread: %.1f s merging, %.1f s waiting for reads, %.1f s for writes; "
                 "%.2f GB of staging buffers; %s", waits["merge"], waits["reads"], waits["writes"],
                 staging.nbytes / 1e9, _disk_reads())


def _merge_tensor(merger, plan, arrays, hp, cast, sources, base_source, staging):
    """``(merged numpy array, jax output to recycle once written or None)`` of one tensor from
    its inputs as read (the models', then the base's)."""
    out = None
    if plan.mergeable:
        handed = [host_buffers.to_jax(a) for a in arrays]  # zero-copy views
        xs, stored = [x for x, _ in handed], [d for _, d in handed]
        base = xs[-1] if base_source is not None else None
        out = merger.merge(xs[: len(sources)], base, hp, cast, stored, name=plan.name)
        merged = np.asarray(out)  # waits for the result
    else:
        merged = _copy_if_equal(plan.name, arrays, sources, base_source)
    if merged.dtype != plan.out.dtype:
        return merged.astype(plan.out.dtype), None
    if staging.holds(merged):
        # An operator that returns an input unchanged (or a copied integer tensor) is a staging
        # view, which a later read overwrites while the write may still wait.
        return merged.copy(), None
    return merged, out


def _disk_reads() -> str:
    """This process's bytes read from storage so far (not from the page cache), Linux only:
    long read waits with few disk bytes mean CPU contention, many mean uncached inputs."""
    try:
        with open("/proc/self/io") as f:
            fields = dict(line.split(": ") for line in f.read().splitlines())
        return f"{int(fields['read_bytes']) / 1e9:.2f} GB read from disk"
    except (OSError, KeyError, ValueError):
        return "disk reads unknown"


def _expected_calls(plans, hps, sources, readers, cast) -> list:
    """``TensorMerger.compile_ahead``'s calls: what ``_stream`` will pass for each tensor."""
    sharding = jax.sharding.SingleDeviceSharding(host_buffers.host_device())
    calls = []
    for plan in plans:
        if not plan.mergeable:
            continue
        placeholders, stored = [], []
        for reader in readers:
            dtype = reader.specs[plan.name].dtype
            storage = host_buffers.storage_dtype(dtype)  # as host_buffers.to_jax hands it over
            placeholders.append(jax.ShapeDtypeStruct(plan.out.shape, storage or dtype,
                                                     sharding=sharding))
            stored.append(None if storage is None else dtype)
        base = placeholders[-1] if len(readers) > len(sources) else None
        calls.append((placeholders[: len(sources)], base, hps[plan.name], cast, stored))
    return calls


def _copy_if_equal(name, arrays, sources, base_source):
    """The input tensor (of a dtype that is not merged) if every input holds the same one;
    ``arrays`` are the models' then the base's."""
    if base_source is not None:
        arrays = arrays[-1:] + arrays[:-1]
    labels = ([base_source.path] if base_source else []) + [s.path for s in sources]
    for label, array in zip(labels[1:], arrays[1:]):
        if not np.array_equal(arrays[0], array):
            raise ValueError(f"tensor '{name}' has dtype {arrays[0].dtype}, which is not merged, "
                             f"and differs between {labels[0]} and {label}")
    return arrays[0]


def merge_from_config(config) -> MergeResult:
    """``merge_checkpoints`` from a recipe (``configs/merge/*.py``; see its keys there)."""
    if not config.output:
        raise ValueError("config.output is empty; pass --config.output=DIR")
    models = list(config.models)
    if not models:
        raise ValueError("config.models is empty; list the checkpoints to merge")

    def plain(value):
        return value.to_dict() if hasattr(value, "to_dict") else dict(value)

    return merge_checkpoints(
        models,
        config.output,
        operator=config.operator,
        base=config.base or None,
        params=plain(config.params),
        rules=[(pattern, plain(values)) for pattern, values in config.rules],
        dtype=config.dtype or None,
        max_shard_size=config.max_shard_size,
        truncate_vocab=config.truncate_vocab,
        overwrite=config.overwrite,
        execution=config.execution,
        direct_write=config.get("direct_write", True),
        progress=config.progress,
    )
