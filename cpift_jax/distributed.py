"""Many hosts: ``jax.distributed`` start-up, barriers with timeouts, and writes by process 0 only.

**Start-up.** ``initialize`` must run before any other JAX call of the process (before the first
``jax.devices()``). Three cases:

- explicit ``coordinator_address``, ``num_processes`` and ``process_id`` (flags of
  ``experiments/cpift.py``);
- nothing given, inside a cluster JAX recognises (Cloud TPU pods, SLURM, Open MPI, ...): JAX's own
  auto-detection supplies the values;
- nothing given, no cluster: a single process, nothing to do.

JAX's coordinator listens on every interface (``[::]:port``) unless told otherwise; here it binds
to ``coordinator_bind_address``, by default the coordinator address itself, so the service is not
reachable from networks the job does not use.

**Failure.** Every process sends heartbeats to the coordinator. A process whose heartbeats stop for
``heartbeat_timeout_s`` (killed, hung, its host gone) is declared dead, and the coordination
service then terminates the surviving processes: the XLA runtime logs that a task stopped
heartbeating (``... heartbeat timeout ...`` / ``UNAVAILABLE``) and aborts them (SIGABRT, exit status
134 from a shell). A run therefore ends with a non-zero status about one heartbeat after a peer
dies; it never hangs in a collective.

**Barriers and files.** ``barrier(name, timeout_s)`` waits until every process arrives and raises
``BarrierTimeoutError`` naming the barrier when one does not. ``write_json``/``write_text``
write atomically and only on process 0 (``is_primary``); ``primary_only`` turns any writer into
one that runs on process 0 alone.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax

__all__ = [
    "initialize",
    "is_initialized",
    "is_primary",
    "process_index",
    "process_count",
    "barrier",
    "BarrierTimeoutError",
    "primary_only",
    "write_text",
    "write_json",
]

logger = logging.getLogger(__name__)

DEFAULT_INITIALIZATION_TIMEOUT_S = 300
DEFAULT_HEARTBEAT_TIMEOUT_S = 100

F = TypeVar("F", bound=Callable[..., Any])


class BarrierTimeoutError(RuntimeError):
    """Some process did not reach a barrier in time (it died, hung, or took another path)."""


def _auto_detected() -> tuple[str | None, int | None, int | None, Any]:
    """Coordinator address, process count, process id and local device ids from the cluster
    environment JAX recognises (TPU pod, SLURM, Open MPI, ``JAX_COORDINATOR_ADDRESS``), or
    ``None``s outside any cluster. Uses JAX's own detectors, the ones ``jax.distributed``
    would run, so the bind address can default to the detected coordinator."""
    from jax._src import clusters  # JAX's detector registry; no public entry point exposes it.

    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    return clusters.ClusterEnv.auto_detect_unset_distributed_params(
        address, None, None, None, None, DEFAULT_INITIALIZATION_TIMEOUT_S
    )


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    coordinator_bind_address: str | None = None,
    initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT_S,
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
) -> bool:
    """Joins this process to a multi-process JAX run; returns whether one was started.

    Give all three of ``coordinator_address`` (``host:port`` of process 0), ``num_processes``
    and ``process_id``, or none of them (auto-detection, else a no-op single process).
    ``coordinator_bind_address`` defaults to ``coordinator_address``. Raises ``ValueError`` for
    a partial set of flags and ``RuntimeError`` when called twice.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
        missing = sorted(k for k, v in given.items() if v is None)
        raise ValueError(
            f"distributed.initialize: {', '.join(missing)} missing; give coordinator_address, "
            "num_processes and process_id together, or none of them for auto-detection"
        )
    if is_initialized():
        raise RuntimeError("distributed.initialize: jax.distributed is already initialized")
    local_device_ids = None
    if coordinator_address is None:
        coordinator_address, num_processes, process_id, local_device_ids = _auto_detected()
        if coordinator_address is None:
            return False  # one process, no cluster around it
    if num_processes == 1:
        return False
    if heartbeat_timeout_s < 1:
        raise ValueError(f"heartbeat_timeout_s must be >= 1 second, got {heartbeat_timeout_s}")
    bind = coordinator_bind_address or coordinator_address
    logger.info(
        "jax.distributed: process %d of %d, coordinator %s (bound to %s), heartbeat timeout %d s",
        process_id, num_processes, coordinator_address, bind, heartbeat_timeout_s,
    )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        coordinator_bind_address=bind,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    return True


def _client():
    from jax._src import distributed as jax_distributed  # the runtime client lives here only

    return jax_distributed.global_state.client


def is_initialized() -> bool:
    return _client() is not None


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """True on process 0, the one that writes JSON, reports, plots and logs."""
    return jax.process_index() == 0


_barrier_uses: dict[str, int] = {}


def barrier(name: str, timeout_s: float = 600.0) -> None:
    """Blocks until every process reaches ``barrier(name)``; a no-op with one process.

    Each process must call the same barriers in the same order. Raises
    ``BarrierTimeoutError`` naming the barrier when not every process arrives within
    ``timeout_s`` seconds.
    """
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    # The coordination service wants a fresh id per barrier instance; the count of earlier
    # uses of this name is the same on every process that calls barriers in the same order.
    count = _barrier_uses.get(name, 0)
    _barrier_uses[name] = count + 1
    barrier_id = f"cpift:{name}:{count}"
    try:
        client.wait_at_barrier(barrier_id, int(timeout_s * 1000))
    except Exception as err:  # the runtime raises JaxRuntimeError with a gRPC status text
        text = str(err)
        if "DEADLINE_EXCEEDED" in text or "timed out" in text.lower() or "deadline" in text.lower():
            raise BarrierTimeoutError(
                f"barrier {name!r}: not every one of the {jax.process_count()} processes "
                f"arrived within {timeout_s:g} s (process {jax.process_index()} waited); a peer "
                f"died, hung or skipped this barrier. Runtime said: {text.splitlines()[0]}"
            ) from err
        raise RuntimeError(f"barrier {name!r} failed on process {jax.process_index()}: {text}") from err


def primary_only(fn: F) -> F:
    """``fn`` run on process 0 only; other processes get ``None`` without calling it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if is_primary():
            return fn(*args, **kwargs)
        return None

    return wrapper  # type: ignore[return-value]


@primary_only
def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic text write on process 0 only: a temporary file in the same directory, renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> None:
    """``obj`` as indented JSON at ``path``, written atomically by process 0 only."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")
