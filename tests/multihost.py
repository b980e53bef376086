"""Launcher for multi-process tests: N Python processes joined by ``jax.distributed`` on 127.0.0.1.

Each child gets its own environment (``JAX_PLATFORMS=cpu``, ``JAX_NUM_CPU_DEVICES``, no
inherited ``XLA_FLAGS``: the pytest process fakes 8 devices, a child fakes its own share) and
runs in its own session, so teardown can kill its whole process group even if the test fails
or a child hangs. A child script starts with::

    from tests import multihost
    ctx = multihost.child_setup()      # before any other JAX call: jax.distributed.initialize

and finds its process id, the process count and a shared scratch directory in ``ctx``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_ENV_PREFIX = "CPIFT_MULTIHOST_"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Result:
    process_id: int
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (f"--- process {self.process_id}: exit {self.returncode}\n"
                f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}")


class Launch:
    """N children of ``script`` (a file) with ``args`` (plus ``per_process_args(launch, pid)``,
    e.g. a binary's distributed flags); a context manager that kills every child's process
    group on exit."""

    def __init__(self, script, num_processes: int = 2, *, devices_per_process: int = 4,
                 workdir=None, heartbeat_timeout_s: int = 10, args=(), extra_env=None,
                 per_process_args=None):
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self._files = []
        for pid in range(num_processes):
            env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
            env.update({
                "JAX_PLATFORMS": "cpu",
                "JAX_NUM_CPU_DEVICES": str(devices_per_process),
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
                f"{_ENV_PREFIX}PORT": str(self.port),
                f"{_ENV_PREFIX}NUM_PROCESSES": str(num_processes),
                f"{_ENV_PREFIX}PROCESS_ID": str(pid),
                f"{_ENV_PREFIX}HEARTBEAT_S": str(heartbeat_timeout_s),
                f"{_ENV_PREFIX}WORKDIR": str(workdir or ""),
                **(extra_env or {}),
            })
            out = open(Path(workdir or "/tmp") / f".p{pid}.{self.port}.out", "w+")
            err = open(Path(workdir or "/tmp") / f".p{pid}.{self.port}.err", "w+")
            self._files.append((out, err))
            self.procs.append(subprocess.Popen(
                [sys.executable, str(script), *map(str, args),
                 *(per_process_args(self, pid) if per_process_args else ())], cwd=REPO, env=env,
                stdout=out, stderr=err, start_new_session=True,
            ))

    def wait(self, timeout_s: float = 60.0) -> list[Result]:
        """Waits for every child (at most ``timeout_s`` in all); a child still running then is
        killed and reported with return code ``None`` replaced by -9."""
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(p)
                p.wait()
        return self.results()

    def results(self) -> list[Result]:
        out = []
        for pid, (p, (o, e)) in enumerate(zip(self.procs, self._files)):
            o.flush(), e.flush(), o.seek(0), e.seek(0)
            out.append(Result(pid, p.returncode, o.read(), e.read()))
        return out

    @staticmethod
    def kill(p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the child's own session: its group id is its pid
        except ProcessLookupError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                self.kill(p)
            p.wait()
        for o, e in self._files:
            for f in (o, e):
                f.close()
                Path(f.name).unlink(missing_ok=True)


def run(script, num_processes: int = 2, *, timeout_s: float = 60.0, **kwargs) -> list[Result]:
    """Launches, waits and asserts every child exited 0 (showing all outputs if not)."""
    with Launch(script, num_processes, **kwargs) as launch:
        results = launch.wait(timeout_s)
    if any(r.returncode != 0 for r in results):
        raise AssertionError("a child failed:\n" + "\n".join(r.describe() for r in results))
    return results


# ----------------------------------------------------------------------------- in the child


@dataclasses.dataclass
class ChildContext:
    process_id: int
    num_processes: int
    workdir: Path

    def emit(self, **values) -> None:
        """One JSON line on stdout for the parent (``parse``)."""
        print("RESULT " + json.dumps(values), flush=True)


def child_setup() -> ChildContext:
    """``distributed.initialize`` from the launcher's environment; call before any JAX call."""
    from cpift_jax import distributed

    env = os.environ
    pid, n = int(env[f"{_ENV_PREFIX}PROCESS_ID"]), int(env[f"{_ENV_PREFIX}NUM_PROCESSES"])
    address = f"127.0.0.1:{env[f'{_ENV_PREFIX}PORT']}"
    distributed.initialize(address, n, pid, coordinator_bind_address=address,
                           initialization_timeout=60,
                           heartbeat_timeout_s=int(env[f"{_ENV_PREFIX}HEARTBEAT_S"]))
    return ChildContext(pid, n, Path(env[f"{_ENV_PREFIX}WORKDIR"]))


def parse(result: Result) -> dict:
    """The merged ``emit`` records of one child."""
    out = {}
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            out.update(json.loads(line[len("RESULT "):]))
    return out
