"""Per-device memory of the train step, core-mask and fusion programs, planned by compiling them
from abstract inputs (``jax.ShapeDtypeStruct``s; nothing is allocated) and reading the
compiler's memory analysis. ``experiments/plan.py`` runs it on faked CPU devices for a
``configs/paper`` slice; docs/paper_configs.md has its output.

- ``plan_step``: the train step (``training.step.train_step``) with an element-wise freeze mask.
  Its state is donated, so the peak is ``arguments + outputs - aliased + temporaries + generated
  code``; arguments are split into parameters, optimizer moments, freeze mask and batch from the
  state's shardings.
- ``plan_masks``: the core-mask passes (``masks.core_mask``'s per-leaf device programs) on every
  distinct leaf kind; resident: base + tuned model + the masks made so far (all of them).
- ``plan_fusion``: CPI fusion (``fusion.fuse_leafwise``, the definition, jitted per leaf kind
  with the backbone's sharding) of ``n_tasks`` task models; resident: backbone, task models,
  their core masks and the fused output.

For the per-leaf programs the peak is the resident bytes plus the largest program's
temporaries, outputs and code. XLA:CPU's analysis is what a CPU backend would allocate; TPU and
GPU compilers lay out, fuse and communicate differently, so callers leave a margin.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from cpift_jax import fusion, masks, optim, select_xla, sharding
from cpift_jax.models.functional import abstract_params
from cpift_jax.training import step as step_lib

GIB = 2**30
# HBM per device, GiB (TPU: per chip as JAX sees it).
DEVICE_MEMORY_GIB = {"tpu-v4": 32, "tpu-v5e": 16, "a100": 80, "h100": 80, "h200": 141}

@dataclasses.dataclass
class Plan:
    """Per-device bytes of one program: the compiler's analysis, a split of its arguments (or
    of the resident buffers) and the peak it implies."""

    name: str
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    parts: dict  # name -> bytes, from the inputs' shardings
    peak: int
    compile_s: float


def shard_bytes(abstract) -> int:
    """Bytes one device holds of a ``jax.ShapeDtypeStruct`` (or array) with a sharding."""
    shape = abstract.sharding.shard_shape(abstract.shape)
    return math.prod(shape) * abstract.dtype.itemsize


def _bytes(tree) -> int:
    return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


def _analysis(compiled):
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes,
            m.temp_size_in_bytes, m.generated_code_size_in_bytes)


def abstract_frozen(model_config):
    """An element-wise freeze mask of every leaf (CPI-FT's stages), as ``ShapeDtypeStruct``s."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bool_),
                        abstract_params(model_config))


def plan_step(model_config, optimizer_config, mesh, batch_shape, step_config, *,
              packed: bool = False) -> Plan:
    """The train step's per-device bytes (module docstring) with an element-wise freeze mask;
    ``packed``: the step of packed rows (``segment_ids`` and ``positions`` in every batch and
    segment-masked attention), as the configs with ``data.pack`` train."""

    pattern = optim.freeze_pattern(abstract_frozen(model_config))
    compiled = step_lib.train_step(model_config, optimizer_config, mesh, batch_shape,
                                   step_config, pattern, packed=packed)
    state = compiled.layout.abstract
    keys = [("tokens", jnp.int32), ("loss_mask", jnp.bool_)]
    keys += [(k, jnp.int32) for k in step_lib.PACKED_KEYS] if packed else []
    batch = {k: jax.ShapeDtypeStruct(batch_shape, d, sharding=compiled.batch_shardings[k])
             for k, d in keys}
    start = time.perf_counter()
    executable = compiled.step.lower(state, batch).compile()
    seconds = time.perf_counter() - start
    arg, out, alias, temp, code = _analysis(executable)
    opt_leaves = jax.tree.leaves(state.opt_state)
    parts = {
        "params": _bytes(state.params),
        "optimizer moments": sum(shard_bytes(x) for x in opt_leaves
                                 if jnp.issubdtype(x.dtype, jnp.floating) and x.shape),
        "freeze mask": sum(shard_bytes(x) for x in opt_leaves if x.dtype == jnp.bool_),
        "batch": _bytes(batch),
    }
    parts["other state"] = arg - sum(parts.values())
    return Plan("train step", arg, out, alias, temp, code, parts,
                arg + out - alias + temp + code, seconds)


def _leaf_kinds(abstract):
    """One ``ShapeDtypeStruct`` per distinct (shape, dtype, sharding) of ``abstract``."""
    kinds = {}
    for x in jax.tree.leaves(abstract):
        kinds.setdefault((x.shape, x.dtype, x.sharding), x)
    return list(kinds.values())


def _per_leaf(name, programs, resident: dict) -> Plan:
    """Resident bytes plus the largest of ``programs`` (compiled executables)."""
    start = time.perf_counter()
    worst = (0, 0, 0, 0, 0)
    for lowered in programs:
        a = _analysis(lowered.compile())
        if a[1] + a[3] + a[4] > worst[1] + worst[3] + worst[4]:
            worst = a
    seconds = time.perf_counter() - start
    arg, out, alias, temp, code = worst
    total = sum(resident.values())
    return Plan(name, arg, out, alias, temp, code, resident, total + out + temp + code, seconds)


def _storage_params(model_config, mesh):
    params = abstract_params(model_config)
    shardings = sharding.tree_shardings(params, sharding.LLAMA_RULES, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        params, shardings)


def plan_masks(model_config, mesh) -> Plan:
    """Core masks of base vs tuned (storage layout, ``masks.core_mask``'s device passes)."""

    params = _storage_params(model_config, mesh)
    rep = NamedSharding(mesh, PartitionSpec())

    def scalar(like):
        return jax.ShapeDtypeStruct(like.shape, like.dtype, sharding=rep)

    u32 = jax.ShapeDtypeStruct((), jnp.uint32, sharding=rep)
    count = select_xla.Count(u32, u32)
    programs = []
    for b in _leaf_kinds(params):
        key = (tuple(b.shape), (b.dtype, b.dtype), b.sharding.spec)
        prog = {n: masks.leaf_program(n, mesh, *key) for n in ("high", "low", "counts", "mask",
                                                                  "cut")}
        hist = jax.eval_shape(prog["high"], b, b)[0]
        high, _ = jax.tree.map(scalar, jax.eval_shape(select_xla.pick_digit, hist, count))
        low_hist = jax.eval_shape(prog["low"], b, b, high)
        low, _ = jax.tree.map(scalar, jax.eval_shape(select_xla.pick_digit, low_hist, count))
        v = scalar(jax.eval_shape(select_xla.digits_value, high, low))
        flag = jax.ShapeDtypeStruct((), jnp.bool_, sharding=rep)
        programs += [prog["high"].lower(b, b), prog["low"].lower(b, b, high),
                     prog["counts"].lower(b, b, v), prog["mask"].lower(b, b, v, flag),
                     prog["cut"].lower(b, b, v, count)]
    size = _bytes(params)
    mask = sum(shard_bytes(x) // x.dtype.itemsize for x in jax.tree.leaves(params))
    return _per_leaf("core masks", programs, {"base": size, "tuned": size, "masks": mask})


def plan_fusion(model_config, mesh, n_tasks: int, merge: str, overlap: str) -> Plan:
    """CPI fusion of ``n_tasks`` task models (``fusion.fuse_leafwise`` per leaf kind)."""

    params = _storage_params(model_config, mesh)
    programs = []
    for b in _leaf_kinds(params):
        m = jax.ShapeDtypeStruct(b.shape, jnp.bool_, sharding=b.sharding)

        def fuse_leaf(backbone, tuned, cores):
            return fusion.fuse_leafwise({"w": backbone}, [{"w": x} for x in tuned],
                                        [{"w": c} for c in cores], merge=merge,
                                        overlap=overlap)["w"]

        programs.append(jax.jit(fuse_leaf, out_shardings=b.sharding).lower(
            b, [b] * n_tasks, [m] * n_tasks))
    size = _bytes(params)
    mask = sum(shard_bytes(x) // x.dtype.itemsize for x in jax.tree.leaves(params))
    return _per_leaf(f"fusion ({n_tasks} tasks)", programs,
                     {"backbone": size, "task models": n_tasks * size,
                      "core masks": n_tasks * mask, "fused": size})


def fits(plan: Plan, device_bytes: int, headroom: float) -> bool:
    return plan.peak <= headroom * device_bytes


def format_plan(plan: Plan, device_bytes: int, headroom: float) -> str:
    gib = lambda n: f"{n / GIB:8.2f} GiB"  # noqa: E731
    lines = [f"{plan.name}: compiled in {plan.compile_s:.1f} s"]
    lines += [f"  {k:22s}{gib(v)}" for k, v in plan.parts.items()]
    lines += [f"  {'arguments':22s}{gib(plan.argument)}", f"  {'outputs':22s}{gib(plan.output)}",
              f"  {'aliased (donated)':22s}{gib(plan.alias)}",
              f"  {'temporaries':22s}{gib(plan.temp)}", f"  {'generated code':22s}{gib(plan.code)}"]
    verdict = "fits" if fits(plan, device_bytes, headroom) else "DOES NOT FIT"
    lines.append(f"  {'peak per device':22s}{gib(plan.peak)}  of {device_bytes / GIB:.0f} GiB "
                 f"({plan.peak / device_bytes:.0%}; limit {headroom:.0%}): {verdict}")
    return "\n".join(lines)
