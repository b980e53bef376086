"""Run an untrusted program against its tests in a sandbox: the runner behind code pass@1.

``run(program, test)`` writes ``program.py`` and ``test.py`` into an empty temporary directory and
executes both, in that order, in one namespace (``__name__ == "__main__"``) with a fresh
``python -I -B``. The test passes when both finish without an exception; the runner then prints a
per-run random marker that the program never sees (it arrives on stdin after the program has been
written, and stdin is closed before the program runs), so ``sys.exit(0)``, ``os._exit(0)`` or
printing "passed" does not count as a pass.

Isolation (all of it or nothing; see docs/evaluation.md for what it does and does not cover):

- ``unshare --net --pid --fork --kill-child --mount-proc --ipc --uts``: no network (a fresh network
  namespace holds only a down loopback), a PID namespace whose init is this module's supervisor (so
  killing it, or its normal exit, kills every process the program spawned, ``setsid`` daemons
  included), private mounts, IPC and host name;
- inside, as root: the whole file system made read-only and ``nosuid`` recursively
  (``mount_setattr(AT_RECURSIVE)``, Linux >= 5.12) except the temporary directory; a minimal
  ``/dev`` (null, zero, full, random, urandom); directories not traversable by other users (such as
  ``/root`` holding a pyenv interpreter) replaced by an empty tmpfs with only the interpreter bound
  back;
- then the supervisor drops to an unprivileged uid/gid (``nobody`` by default, no supplementary
  groups, ``no_new_privs``, not dumpable) and forks the program with resource limits (CPU seconds,
  address space, file size, processes, open files, no core dumps);
- a wall-clock limit after which the supervisor is killed with SIGKILL (which tears the namespace
  down) and the runner waits until ``unshare`` has reaped it.

This needs root (or CAP_SYS_ADMIN with the right to switch uid) and util-linux ``unshare``. Where
that is missing ``run`` refuses with ``reason = "sandbox unavailable: ..."`` unless the caller passes
``allow_unsandboxed=True``, which keeps only the temporary directory, the resource limits and the
process-group kill (no network, file-system or PID isolation: a ``setsid`` daemon survives).

The child side (supervisor and program runner) is ``sandbox_child.py``, run by path and
importing only the standard library.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

from cpift_jax.evals import sandbox_child

__all__ = ["CodeResult", "run", "sandbox_problem"]

_TAIL_BYTES = 4000
_KILL_GRACE_S = 5.0


@dataclasses.dataclass(frozen=True)
class CodeResult:
    """Outcome of one sandboxed run: ``passed`` and a human-readable ``reason`` ("passed",
    "failed: AssertionError: ...", "timeout after 10 s", "memory limit ...", "killed by signal N
    (NAME)", "sandbox unavailable: ..."), with the tails of the program's output."""

    passed: bool
    reason: str
    duration_s: float
    stdout: str = ""
    stderr: str = ""


# ----------------------------------------------------------------------------------- host side


def sandbox_problem() -> str | None:
    """Why the sandbox cannot be built on this machine, or None when it can (static checks; a
    failure while building it is still reported by ``run``)."""
    if sys.platform != "linux":
        return f"needs Linux namespaces, this is {sys.platform}"
    if os.geteuid() != 0:
        return (f"needs root to create mount/network/PID namespaces and switch uid (euid is "
                f"{os.geteuid()})")
    if shutil.which("unshare") is None:
        return "util-linux `unshare` not found on PATH"
    if sandbox_child.MOUNT_SETATTR_NR.get(platform.machine()) is None:
        return f"mount_setattr syscall number unknown for {platform.machine()}"
    for ns in ("net", "pid", "mnt", "ipc", "uts"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            return f"kernel without {ns} namespaces (/proc/self/ns/{ns} missing)"
    return None


def run(program: str, test: str, *, timeout_s: float = 10.0, memory_mb: int = 1024,
        file_size_mb: int = 16, max_processes: int = 64, max_open_files: int = 64,
        sandbox_uid: int = 65534, sandbox_gid: int = 65534,
        allow_unsandboxed: bool = False) -> CodeResult:
    """Run ``program`` then ``test`` in the sandbox; passed iff both complete without exception
    within ``timeout_s`` wall-clock seconds (CPU time is capped at ceil(timeout_s) + 1 s).

    ``memory_mb`` caps the address space, ``file_size_mb`` any file the program writes (its output
    included), ``max_processes`` the processes and threads of ``sandbox_uid`` (a per-uid count:
    concurrent runs share it). Refuses, without running anything, when the sandbox cannot be built,
    unless ``allow_unsandboxed`` (limits, temporary directory and process group only)."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    for name, value in (("memory_mb", memory_mb), ("file_size_mb", file_size_mb),
                        ("max_processes", max_processes), ("max_open_files", max_open_files)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    problem = sandbox_problem()
    sandboxed = problem is None
    if not sandboxed and not allow_unsandboxed:
        return CodeResult(False, f"sandbox unavailable: {problem} (pass allow_unsandboxed=True to "
                          "run with resource limits only)", 0.0)
    limits = {"cpu_s": math.ceil(timeout_s) + 1, "memory_bytes": int(memory_mb) << 20,
              "file_bytes": int(file_size_mb) << 20, "nproc": int(max_processes),
              "nofile": int(max_open_files)}
    workdir = tempfile.mkdtemp(prefix="cpift-code-")
    if sandboxed and (blocked := _untraversable_ancestor(os.path.dirname(workdir))):
        shutil.rmtree(workdir)
        return CodeResult(False, f"sandbox unavailable: the temporary directory {workdir} sits "
                          f"under {blocked}, which uid {sandbox_uid} cannot traverse (set TMPDIR)",
                          0.0)
    iodir = tempfile.mkdtemp(prefix="cpift-code-io-")  # outside the sandbox's writable directory
    try:
        for name, text in (("program.py", program), ("test.py", test)):
            with open(os.path.join(workdir, name), "w", encoding="utf-8") as f:
                f.write(text)
        if sandboxed:
            for name in ("", "program.py", "test.py"):
                os.chown(os.path.join(workdir, name), sandbox_uid, sandbox_gid)
            setup = {"workdir": workdir, "uid": sandbox_uid, "gid": sandbox_gid,
                     "hidden": _hidden_interpreter_dirs(), "limits": limits}
            cmd = [shutil.which("unshare"), "--net", "--pid", "--fork", "--kill-child",
                   "--mount-proc", "--ipc", "--uts", "--",
                   sys.executable, "-I", "-B", os.path.abspath(sandbox_child.__file__), "sandbox",
                   json.dumps(setup)]
        else:
            cmd = [sys.executable, "-I", "-B", os.path.abspath(sandbox_child.__file__), "plain",
                   json.dumps({"workdir": workdir, "limits": limits})]
        return _execute(cmd, workdir, iodir, timeout_s, sandboxed, memory_mb)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(iodir, ignore_errors=True)


def _execute(cmd, workdir, iodir, timeout_s, sandboxed, memory_mb) -> CodeResult:
    nonce = secrets.token_hex(16)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir,
           "TMPDIR": workdir}  # nothing of the caller's environment (tokens, keys) leaks in
    out_path, err_path = os.path.join(iodir, "stdout"), os.path.join(iodir, "stderr")
    start = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, env=env,
                                cwd=workdir, start_new_session=True, close_fds=True)
    try:
        proc.stdin.write((nonce + "\n").encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_everything(proc, sandboxed)
    duration = time.monotonic() - start
    stdout, stderr = _tail(out_path), _tail(err_path)
    reason = _classify(proc.returncode, stdout, stderr, nonce, timed_out, timeout_s, sandboxed,
                       memory_mb)
    stdout = stdout.replace(f"\n{sandbox_child.PASS_MARKER}{nonce}\n", "")
    return CodeResult(reason == "passed", reason, duration, stdout, stderr)


def _kill_everything(proc: subprocess.Popen, sandboxed: bool) -> None:
    """Sandboxed: kill the supervisor (PID-namespace init: the kernel then kills every process in
    the namespace, and init only exits once they are gone) and wait until ``unshare`` has reaped
    it; nothing of the run lives outside the namespace. Unsandboxed: kill the process group."""
    if sandboxed:
        if proc.poll() is None:
            for child in _children(proc.pid):
                _signal(os.kill, child, signal.SIGKILL)
            try:
                proc.wait(timeout=_KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal(os.killpg, proc.pid, signal.SIGKILL)
    else:
        _signal(os.killpg, proc.pid, signal.SIGKILL)
    proc.wait()


def _signal(send, pid: int, sig: int) -> None:
    try:
        send(pid, sig)
    except ProcessLookupError:
        pass


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _tail(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - _TAIL_BYTES))
        return f.read().decode("utf-8", errors="replace")


def _last_line(text: str) -> str:
    """The last line that is not traceback scaffolding: the exception line of the program's
    traceback, even when forked copies of the program interleave theirs."""
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.startswith(("Traceback (", " "))]
    return lines[-1][:300] if lines else ""


def _classify(rc, stdout, stderr, nonce, timed_out, timeout_s, sandboxed, memory_mb) -> str:
    if timed_out:
        return f"timeout after {timeout_s:g} s"
    if rc == sandbox_child.SETUP_EXIT and sandbox_child.SETUP_FAILED in stderr:
        return "sandbox unavailable: " + stderr.split(sandbox_child.SETUP_FAILED, 1)[1].strip()[:300]
    if sandboxed and rc == 1 and stderr.startswith("unshare:"):
        return "sandbox unavailable: " + _last_line(stderr)
    if rc == sandbox_child.LEFTOVER_EXIT and sandbox_child.LEFTOVER in stderr:
        return "failed: left background processes running (killed with the sandbox)"
    if rc == 0 and f"{sandbox_child.PASS_MARKER}{nonce}" in stdout:
        return "passed"
    if rc == sandbox_child.MEMORY_EXIT and "MemoryError" in stderr:
        return f"memory limit: MemoryError at {memory_mb} MB of address space"
    sig = (rc - 128 if rc > 128 else None) if sandboxed else (-rc if rc < 0 else None)
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.valid_signals() else "?"
        if sig == signal.SIGXCPU:
            return "cpu time limit (SIGXCPU)"
        return f"killed by signal {sig} ({name})"
    if rc == 0:
        return "failed: exited before the tests finished (status 0)"
    return "failed: " + (_last_line(stderr) or f"exit status {rc}")


def _hidden_interpreter_dirs() -> dict[str, list[str]]:
    """{top directory others cannot traverse: [interpreter directories under it]}: the sandbox
    covers each top directory with an empty tmpfs and binds only these back (a pyenv Python under
    a 0700 /root stays usable by ``nobody`` while the rest of /root disappears)."""
    needed = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.base_exec_prefix,
                                            os.path.dirname(os.path.realpath(sys.executable)))}
    hidden: dict[str, list[str]] = {}
    for path in sorted(needed):
        if any(path.startswith(other + "/") for other in needed):
            continue  # bound back with its ancestor
        if top := _untraversable_ancestor(path):
            hidden.setdefault(top, []).append(path)
    return hidden


def _untraversable_ancestor(path: str) -> str | None:
    """The topmost directory on ``path`` (itself included) that other users cannot enter."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ancestor
    return None
