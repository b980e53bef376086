"""The host machine as the CPU code paths see it."""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import threading

import jax
import numpy as np

__all__ = ["usable_cpus", "thread_pool", "reduction_compiler_options"]

logger = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which container CPU limits set), not the
    machine's count: thread pools sized by it do not oversubscribe a restricted process."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    """One pool of ``usable_cpus()`` threads for the CPU paths that split work across cores
    (fusion pass 1, the threshold's counting passes). Its tasks must not wait on other tasks
    of the pool."""
    return concurrent.futures.ThreadPoolExecutor(usable_cpus(), thread_name_prefix="cpift-host")


# XLA:CPU's newer fusion emitters run a many-output float reduction (fusion pass 1, SLERP's
# inner products) as a scalar loop (float adds are not reassociated); the classic emitter
# vectorises it, ~4x faster here. Elementwise passes are faster with the default.
_REDUCTION_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


_PROBE_LOCK = threading.Lock()


def reduction_compiler_options(platform: str) -> dict:
    """Compiler options for a reduction-dominated program on ``platform``: the classic XLA:CPU
    emitter on CPU if this XLA compiles a tiny program with it (an XLA that no longer knows the
    option refuses it), else none. Checked once per process, at first use (fusion's pass-1
    threads may ask at the same time, hence the lock)."""
    if platform != "cpu":
        return {}
    with _PROBE_LOCK:
        return dict(_probe_reduction_options())


@functools.cache
def _probe_reduction_options() -> dict:
    probe = jax.device_put(np.zeros(1, np.float32), jax.devices("cpu")[0])
    try:
        jax.jit(lambda x: x + 1, compiler_options=_REDUCTION_OPTIONS).lower(probe).compile()
    except jax.errors.JaxRuntimeError as err:
        logger.info("reductions use XLA:CPU's default emitters: %s is refused (%s)",
                    _REDUCTION_OPTIONS, err)
        return {}
    logger.info("reductions compile with %s", _REDUCTION_OPTIONS)
    return dict(_REDUCTION_OPTIONS)
