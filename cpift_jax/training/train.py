"""Supervised fine-tuning: the training loop over the compiled step of ``training.step``.

Loss (per batch): ``L = sum_i m_i * -log p(x_i | x_<i) / max(1, sum_i m_i)`` over every row and
position ``i >= 1``, where ``m`` is the batch's ``loss_mask`` (1 on answer tokens and the final
EOS, see ``cpift_jax.data.batching``), computed in float32 (``training.loss``).
Gradient clipping, AdamW, the schedule and element-wise freezing all come from
``cpift_jax.optim.make``, so frozen entries stay bit-identical.

Batches are dicts ``{"tokens": int [B, S], "loss_mask": bool [B, S]}`` from any iterator
(``batching.batches`` / ``mixture_batches`` / LM rows from ``corpus``): NumPy arrays, placed on
the mesh with the batch sharding, or global ``jax.Array``s already sharded (multi-host loaders).

Layouts: the parameters come in and go out in the storage layout (``model/layers/{i}/...``);
inside, the state has the step's layout (``training.step.StateLayout``: stacked layers with
``scan_layers``), converted once on entry and once on exit (and before each ``eval_fn``).

Mid-stage checkpoints: with ``checkpoint_dir`` and ``checkpoint_every``, the state (in the
step's layout) and the data position are saved asynchronously every ``checkpoint_every`` steps
and after the last one (``checkpoints.TrainCheckpoints``); a rerun with the same directory
restores the latest complete one and continues from there, so an interrupted run and an
uninterrupted one give the same bits.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from tqdm import tqdm

from cpift_jax import models
from cpift_jax import optim
from cpift_jax import sharding
from cpift_jax.training import checkpoints as checkpoints_lib
from cpift_jax.training import step as step_lib
from cpift_jax.training.loss import masked_cross_entropy  # noqa: F401 (re-exported)
from cpift_jax.training.step import StateLayout, StepConfig, TrainState

__all__ = ["masked_cross_entropy", "train", "TrainState", "StepConfig"]

Pytree = Any

_BATCH_DTYPES = {"tokens": np.int32, "loss_mask": np.bool_,
                 "segment_ids": np.int32, "positions": np.int32}  # the last two: packed rows


def _check_batch(batch) -> None:
    keys = set(batch) if isinstance(batch, dict) else None
    if keys not in (set(step_lib.BATCH_KEYS), set(step_lib.BATCH_KEYS + step_lib.PACKED_KEYS)):
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"a batch must be a dict with keys tokens and loss_mask (packed rows: "
                         f"also segment_ids and positions), got {got}")
    shapes = {k: tuple(np.shape(v)) for k, v in batch.items()}
    if len(shapes["tokens"]) != 2 or any(s != shapes["tokens"] for s in shapes.values()):
        raise ValueError(
            f"batch arrays must share one [rows, seq] shape, got {shapes}")


def _place_batch(batch: dict, shardings: dict) -> dict:
    """Each array on its batch sharding: NumPy data is put there; a ``jax.Array`` already
    there is used as it is (a global array of a multi-host loader)."""
    out = {}
    for name, value in batch.items():
        target, dtype = shardings[name], _BATCH_DTYPES[name]
        if isinstance(value, jax.Array):
            if value.dtype != dtype:
                value = value.astype(dtype)
            if not value.sharding.is_equivalent_to(target, value.ndim):
                if not value.is_fully_addressable:
                    raise ValueError(
                        f"batch '{name}' spans other processes with sharding {value.sharding}, "
                        f"but the train step needs {target}; build it with that sharding"
                    )
                value = jax.device_put(value, target)
            out[name] = value
        else:
            out[name] = jax.device_put(np.asarray(value, dtype), target)
    return out


def _fresh_on(tree: Pytree, shardings: Pytree) -> Pytree:
    """``tree`` on ``shardings`` in buffers of its own, so donating them never invalidates the
    caller's arrays. A ``device_put`` of a ``jax.Array`` may hand back the caller's buffer as
    one of the shards (even with ``may_alias=False`` when replicating from one device, jax
    0.10.2), so device arrays are copied after the move; host data is copied by the move."""

    def put(x, target):
        if isinstance(x, jax.Array):
            return jnp.array(jax.device_put(x, target), copy=True)
        return jax.device_put(x, target)

    return jax.tree.map(put, tree, shardings)


def _mean(values: list) -> float:
    return float(np.mean([float(v) for v in values])) if values else float("nan")


def _to_storage(layout: StateLayout, params: Pytree) -> Pytree:
    return params if layout.leave is None else layout.leave(params)


def _fresh_state(layout: StateLayout, params: Pytree, frozen_arrays: Pytree,
                 optimizer_config) -> TrainState:
    """Step 0 in the step's layout, in buffers of its own (the caller's arrays survive the
    step's donation)."""
    if layout.enter is None:
        params = _fresh_on(params, layout.shardings.params)
    else:
        placed = jax.device_put(params, layout.storage_shardings)
        if frozen_arrays is not None:
            frozen_arrays = jax.device_put(frozen_arrays, layout.storage_mask_shardings)
        params, frozen_arrays = layout.enter(placed, frozen_arrays)
    opt_state = layout.init(params, frozen_arrays, optim.schedule_numbers(optimizer_config))
    return TrainState(params, opt_state, step_lib.replicated_step(0, layout.shardings.step))


def _data_state(batches, step: int) -> dict:
    """The iterator's position after ``step`` steps: its own ``get_state()`` when it has one
    (``GlobalBatchLoader``), else the number of batches taken."""
    if hasattr(batches, "get_state"):
        return batches.get_state()
    return {"batches_taken": int(step)}


def _restore_position(batches, data_state: dict, where: Path) -> None:
    """Moves a fresh ``batches`` to ``data_state`` (``_data_state``'s record)."""
    if hasattr(batches, "set_state"):
        if "batches_taken" in data_state:
            raise ValueError(f"checkpoint {where} was written from a plain batch iterator "
                             f"({data_state}), but this run's iterator has set_state")
        batches.set_state(data_state)
        return
    if set(data_state) != {"batches_taken"}:
        raise ValueError(f"checkpoint {where} holds the iterator state {data_state}, which "
                         "only an iterator with set_state (GlobalBatchLoader) can restore")
    for _ in range(int(data_state["batches_taken"])):
        next(batches)


def train(
    model_config: models.ModelConfig,
    params: Pytree,
    optimizer_config,
    batches: Iterator[dict],
    *,
    steps: int,
    frozen: Pytree | None = None,
    eval_every: int = 0,
    eval_fn: Callable[[Pytree], dict[str, float]] | None = None,
    metrics_path: str | os.PathLike | None = None,
    log_every: int = 25,
    progress: bool = True,
    description: str = "train",
    mesh: Mesh | None = None,
    step_config: StepConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
) -> tuple[Pytree, list[dict]]:
    """Runs optimizer steps ``1 .. steps`` on ``next(batches)`` and returns ``(params, history)``.

    Args:
      model_config, params: the model; ``params`` (host or device arrays, storage layout) is
        copied onto the mesh, so the caller's arrays survive. The returned params stay on the
        mesh with the parameters' shardings, in the storage layout.
      optimizer_config: a ``cpift_jax.optim.default_config()``-like ConfigDict; ``frozen`` an
        element-wise freeze mask for ``optim.make`` (True = frozen, kept bit-identical).
      eval_every: call ``eval_fn(params) -> {name: score}`` every that many steps and after the
        last one (0: only after the last one; no ``eval_fn``: never).
      metrics_path: JSON-lines file (overwritten; appended to when the run resumes from a
        checkpoint): one record per logged step with ``step``, ``loss`` / ``grad_norm`` /
        ``tokens`` (means over the steps since the last record), ``learning_rate``,
        ``elapsed_s``, and ``eval`` (``{name: score}``) when evaluated.
      log_every: steps per record; the last step is always recorded.
      progress: a tqdm bar on stderr when it is a terminal (erased when the loop ends);
        evaluations are also logged with absl.
      mesh: the device mesh (None: the default mesh config on this process's first device).
      step_config: how the step computes (``training.step.StepConfig``; None: defaults).
      checkpoint_dir, checkpoint_every: with both (``checkpoint_every >= 1``), save the train
        state and ``batches``' position (``batches.get_state()`` when it has one, else
        ``{"batches_taken": n}``) into ``checkpoint_dir/<step>/`` every ``checkpoint_every``
        steps and after the last step, asynchronously (``checkpoints.TrainCheckpoints``, the
        last two kept). On entry, a complete checkpoint there is restored onto the step's
        state shardings, ``batches`` (given fresh, from the stage's start) is moved to its
        position (``set_state``, or by skipping the recorded number of batches), and the run
        continues with the next step; a checkpoint of step ``steps`` returns its params at
        once. A checkpoint of another model, freeze pattern or step layout raises
        ``ValueError`` naming the leaf and the checkpoint. ``checkpoint_dir`` without
        ``checkpoint_every`` is an error; ``checkpoint_every`` without ``checkpoint_dir``
        saves nothing. Pending saves are finished before ``train`` returns or raises.

    The train step is compiled once per ``training.step.train_step`` key and reused by every
    call (stages of any length, learning rate or freeze mask). The result depends only on the
    inputs: same params, batches and configs give the same bits, resumed or not.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if eval_every < 0 or log_every < 1 or checkpoint_every < 0:
        raise ValueError("need eval_every >= 0, log_every >= 1 and checkpoint_every >= 0, got "
                         f"{eval_every}, {log_every}, {checkpoint_every}")
    if eval_every and eval_fn is None:
        raise ValueError("eval_every is set but no eval_fn was given")
    if checkpoint_dir is not None and not checkpoint_every:
        raise ValueError(f"checkpoint_dir {checkpoint_dir} is set but checkpoint_every is 0")
    if mesh is None:
        mesh = sharding.make_mesh(sharding.default_mesh_config(),
                                  devices=jax.local_devices()[:1])
    step_config = StepConfig.from_config(step_config)
    schedule = optim.learning_rate_schedule(optimizer_config)  # also checks the config
    pattern, frozen_arrays = (None, None) if frozen is None else optim.split_freeze_mask(
        frozen, params)
    layout = step_lib.state_layout(model_config, optimizer_config, mesh, step_config, pattern)
    saver = (checkpoints_lib.TrainCheckpoints(checkpoint_dir)
             if checkpoint_dir is not None else None)
    try:
        resumed = None
        if saver is not None and saver.latest_step() is not None:
            resumed = saver.restore(layout.abstract)
            done = int(resumed.state.step)
            where = saver.directory / str(done)
            if done > steps:
                raise ValueError(f"checkpoint {where} is at step {done}, past this run's "
                                 f"{steps} steps")
            if done == steps:
                return _to_storage(layout, resumed.state.params), []
            _restore_position(batches, resumed.data_state, where)
        first = next(batches)
        _check_batch(first)
        compiled = step_lib.train_step(model_config, optimizer_config, mesh,
                                       np.shape(first["tokens"]), step_config, pattern,
                                       packed="segment_ids" in first)
        if resumed is None:
            state = _fresh_state(layout, params, frozen_arrays, optimizer_config)
            first_step = 1
        else:
            state, first_step = resumed.state, int(resumed.state.step) + 1
        result = _loop(compiled, state, first, batches, first_step=first_step, steps=steps,
                        schedule=schedule, eval_every=eval_every, eval_fn=eval_fn,
                        metrics_path=metrics_path, append=resumed is not None,
                        log_every=log_every, progress=progress, description=description,
                        saver=saver, checkpoint_every=checkpoint_every)
    finally:
        if saver is not None:
            saver.close()  # waits for the pending saves
    return result


def _loop(compiled: step_lib.TrainStep, state: TrainState, first: dict, batches, *,
          first_step: int, steps: int, schedule, eval_every: int, eval_fn, metrics_path,
          append: bool, log_every: int, progress: bool, description: str, saver,
          checkpoint_every: int) -> tuple[Pytree, list[dict]]:
    """Steps ``first_step .. steps`` of ``train`` (``first``: the batch of ``first_step``);
    returns ``(params in the storage layout, history)``."""
    layout = compiled.layout
    history: list[dict] = []
    window: list[dict] = []
    sink = open(metrics_path, "a" if append else "w") if metrics_path is not None else None
    start = time.perf_counter()
    # disable=None: drawn only when stderr is a terminal, so a log file gets no bar frames;
    # leave=False: a finished loop's bar is erased (the caller reports the finished stage).
    bar = tqdm(total=steps, initial=first_step - 1, desc=description, file=sys.stderr,
               disable=None if progress else True, leave=False, dynamic_ncols=True)
    try:
        for step in range(first_step, steps + 1):
            batch = first if step == first_step else next(batches)
            _check_batch(batch)
            if set(batch) != set(compiled.batch_shardings):
                raise ValueError(f"step {step}: batch keys {sorted(batch)} differ from the first "
                                 f"batch's {sorted(compiled.batch_shardings)} (packed or not)")
            state, metrics = compiled.step(state, _place_batch(batch, compiled.batch_shardings))
            window.append(metrics)
            bar.update(1)
            last = step == steps
            if saver is not None and (last or step % checkpoint_every == 0):
                # The save copies the arrays off the devices before it returns, so the next
                # step may take (donate) their buffers.
                saver.save(checkpoints_lib.ResumePoint(state, _data_state(batches, step)))
            do_eval = eval_fn is not None and (last or (eval_every and step % eval_every == 0))
            if not (last or do_eval or step % log_every == 0):
                continue
            window = jax.device_get(window)  # scalars only
            record = {
                "step": step,
                "loss": _mean([m["loss"] for m in window]),
                "grad_norm": _mean([m["grad_norm"] for m in window]),
                "tokens": _mean([m["tokens"] for m in window]),
                "learning_rate": float(schedule(step - 1)),
            }
            window = []
            if do_eval:
                scores = {k: float(v) for k, v in
                          eval_fn(_to_storage(layout, state.params)).items()}
                record["eval"] = scores
                logging.info("%s step %d: eval %s", description, step,
                             ", ".join(f"{k}={v:.3f}" for k, v in scores.items()))
            record["elapsed_s"] = round(time.perf_counter() - start, 3)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            history.append(record)
            if sink is not None:
                sink.write(json.dumps(record) + "\n")
                sink.flush()
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    return _to_storage(layout, state.params), history
