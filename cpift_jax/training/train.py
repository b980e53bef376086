"""Supervised fine-tuning: a jitted train step with an answer-only loss, and the training loop.

Loss (per batch): ``L = sum_i m_i * -log p(x_i | x_<i) / max(1, sum_i m_i)`` over every row and
position ``i >= 1``, where ``m`` is the batch's ``loss_mask`` (1 on answer tokens and the final
EOS, see ``cpift_jax.data.batching``), computed in float32 from the model's float32 logits.
Gradient clipping, AdamW, the schedule and element-wise freezing all come from
``cpift_jax.optim.make``, so frozen entries stay bit-identical.

Batches are dicts of numpy or jax arrays ``{"tokens": int [B, S], "loss_mask": bool [B, S]}``
from any iterator (``batching.batches`` / ``mixture_batches`` / LM rows from ``corpus``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from cpift_jax import models
from cpift_jax import optim

__all__ = ["masked_cross_entropy", "make_train_step", "train"]

Pytree = Any


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """(mean NLL over ``mask``, number of masked tokens); float32 throughout."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    count = m.sum()
    return (nll * m).sum() / jnp.maximum(count, 1.0), count


def make_train_step(model_config: models.ModelConfig, optimizer: optax.GradientTransformation):
    """``step(params, opt_state, batch) -> (params, opt_state, metrics)``, jitted.

    ``params`` and ``opt_state`` are donated (their buffers are reused for the outputs; do not
    touch the arguments afterwards). ``metrics``: ``loss`` (masked mean cross-entropy before
    the update), ``grad_norm`` (global norm of the raw gradient, before clipping) and
    ``tokens`` (number of supervised tokens), all float32 scalars.
    """

    def loss_fn(params, batch):
        tokens = batch["tokens"]
        logits = models.logits(model_config, params, tokens[:, :-1])
        return masked_cross_entropy(logits, tokens[:, 1:], batch["loss_mask"][:, 1:])

    def _step(params, opt_state, batch):
        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": count}
        return params, opt_state, metrics

    step = jax.jit(_step, donate_argnums=(0, 1))

    def checked_step(params, opt_state, batch):
        if not isinstance(batch, dict) or set(batch) != {"tokens", "loss_mask"}:
            got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"a batch must be a dict with keys tokens and loss_mask, got {got}")
        return step(params, opt_state, batch)

    checked_step.jitted = step
    return checked_step


def _copy(params: Pytree) -> Pytree:
    """Fresh device buffers, so donating them never invalidates the caller's arrays."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), params)


def _mean(values: list) -> float:
    return float(np.mean([float(v) for v in values])) if values else float("nan")


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
) -> tuple[Pytree, list[dict]]:
    """Runs ``steps`` optimizer steps on ``next(batches)`` and returns ``(params, history)``.

    Args:
      model_config, params: the model; ``params`` is copied, so the caller's arrays survive.
      optimizer_config: a ``cpift_jax.optim.default_config()``-like ConfigDict; ``frozen`` an
        element-wise freeze mask for ``optim.make`` (True = frozen, kept bit-identical).
      eval_every: call ``eval_fn(params) -> {name: score}`` every that many steps and after the
        last one (0: only after the last one; no ``eval_fn``: never).
      metrics_path: JSON-lines file (overwritten): one record per logged step with ``step``,
        ``loss`` / ``grad_norm`` / ``tokens`` (means over the steps since the last record),
        ``learning_rate``, ``elapsed_s``, and ``eval`` (``{name: score}``) when evaluated.
      log_every: steps per record; the last step is always recorded.
      progress: a tqdm bar on stderr when it is a terminal (erased when the loop ends);
        evaluations are also logged with absl.

    The result depends only on the inputs: same params, batches and configs give the same bits.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if eval_every < 0 or log_every < 1:
        raise ValueError(f"need eval_every >= 0 and log_every >= 1, got {eval_every}, {log_every}")
    if eval_every and eval_fn is None:
        raise ValueError("eval_every is set but no eval_fn was given")
    tx = optim.make(optimizer_config, frozen)
    schedule = optim.learning_rate_schedule(optimizer_config)
    params = _copy(params)
    opt_state = tx.init(params)  # outside jit: the freeze mask stays an argument (optim docs)
    step_fn = make_train_step(model_config, tx)

    history: list[dict] = []
    window: list[dict] = []
    sink = open(metrics_path, "w") if metrics_path is not None else None
    start = time.perf_counter()
    # disable=None: drawn only when stderr is a terminal, so a log file gets no bar frames;
    # leave=False: a finished loop's bar is erased (the caller reports the finished stage).
    bar = tqdm(total=steps, desc=description, file=sys.stderr, disable=None if progress else True,
               leave=False, dynamic_ncols=True)
    try:
        for step in range(1, steps + 1):
            params, opt_state, metrics = step_fn(params, opt_state, next(batches))
            window.append(metrics)
            bar.update(1)
            last = step == steps
            do_eval = eval_fn is not None and (last or (eval_every and step % eval_every == 0))
            if not (last or do_eval or step % log_every == 0):
                continue
            window = jax.device_get(window)
            record = {
                "step": step,
                "loss": _mean([m["loss"] for m in window]),
                "grad_norm": _mean([m["grad_norm"] for m in window]),
                "tokens": _mean([m["tokens"] for m in window]),
                "learning_rate": float(schedule(step - 1)),
            }
            window = []
            if do_eval:
                scores = {k: float(v) for k, v in eval_fn(params).items()}
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
    return params, history
