"""The sandboxed code runner: passing and failing programs, and programs that try to escape (loop
forever, allocate without bound, write outside their directory, reach the network, leave a daemon
behind, fake a pass). Each escape is scored as a failure with a reason and contained."""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
import textwrap
import time

import pytest

from cpift_jax.evals import code

SANDBOX_PROBLEM = code.sandbox_problem()
needs_sandbox = pytest.mark.skipif(
    SANDBOX_PROBLEM is not None, reason=f"sandbox cannot be built here: {SANDBOX_PROBLEM}")

# The daemon: double fork + setsid, then exec a sleeper whose command line carries a token that the
# test looks for in this (outer) PID namespace's /proc afterwards.
DAEMON = textwrap.dedent("""
    import os, sys, time
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c",
                     "open('daemon-started', 'w').close(); import time; time.sleep(120)", TOKEN])
        os._exit(0)
    os.waitpid(pid, 0)
    for _ in range(500):
        if os.path.exists("daemon-started"):
            break
        time.sleep(0.01)
    """)


def _processes_with(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if token.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.fixture
def open_dir():
    """A world-writable directory outside the sandbox: only the read-only mount stops a write."""
    path = tempfile.mkdtemp(prefix="cpift-code-target-")
    os.chmod(path, 0o777)
    yield path
    for name in os.listdir(path):
        os.remove(os.path.join(path, name))
    os.rmdir(path)


@needs_sandbox
def test_passing_program_passes_and_may_write_its_own_directory():
    program = "def add(a, b):\n    return a + b\nopen('scratch.txt', 'w').write('ok')\n"
    result = code.run(program, "assert add(2, 3) == 5\nassert open('scratch.txt').read() == 'ok'\n"
                      "print('hello')\n")
    assert result.passed, result
    assert result.reason == "passed"
    assert result.stdout.strip() == "hello"  # the pass marker is not part of the output


@needs_sandbox
def test_failing_program_reports_the_exception():
    result = code.run("def add(a, b):\n    return a - b\n", "assert add(2, 3) == 5, 'wrong sum'\n")
    assert not result.passed
    assert result.reason == "failed: AssertionError: wrong sum"


@needs_sandbox
@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)",
                                       "print('passed')\nimport os; os._exit(0)"])
def test_exiting_early_is_not_a_pass(exit_call):
    result = code.run(exit_call + "\n", "assert False\n")
    assert not result.passed, result
    assert result.reason.startswith("failed:")


@needs_sandbox
def test_unbounded_allocation_hits_the_memory_limit():
    program = "chunks = []\nwhile True:\n    chunks.append(bytearray(32 << 20))\n"
    start = time.monotonic()
    result = code.run(program, "", timeout_s=10, memory_mb=256)
    assert not result.passed
    assert result.reason.startswith("memory limit"), result
    assert time.monotonic() - start < 10


@needs_sandbox
def test_fork_bomb_hits_the_process_limit():
    start = time.monotonic()
    result = code.run("import os\nwhile True:\n    os.fork()\n", "", timeout_s=5,
                      max_processes=16)
    assert not result.passed
    assert result.reason.startswith("failed: BlockingIOError"), result
    assert time.monotonic() - start < 5


@needs_sandbox
def test_write_outside_the_directory_is_refused(open_dir):
    target = os.path.join(open_dir, "escaped.txt")
    result = code.run(f"open({target!r}, 'w').write('x')\n", "")
    assert not result.passed
    assert "Read-only file system" in result.reason, result
    assert not os.path.exists(target)


@needs_sandbox
def test_root_only_files_and_the_callers_environment_stay_out(monkeypatch, open_dir):
    secret = os.path.join(open_dir, "secret.txt")
    with open(secret, "w") as f:
        f.write("s3cret")
    os.chmod(secret, 0o600)
    monkeypatch.setenv("CPIFT_TEST_TOKEN", "s3cret")
    program = textwrap.dedent(f"""
        import os
        assert "CPIFT_TEST_TOKEN" not in os.environ
        assert os.getuid() != 0
        try:
            open({secret!r}).read()
        except PermissionError:
            pass
        else:
            raise AssertionError("read a root-only file")
        """)
    result = code.run(program, "")
    assert result.passed, result


@needs_sandbox
def test_no_connection_reaches_a_listener_on_loopback():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), "
                   "timeout=2)\ns.sendall(b'leak')\n")
        result = code.run(program, "", timeout_s=5)
        assert not result.passed
        assert result.reason.startswith("failed: OSError"), result
        with pytest.raises(socket.timeout):
            server.accept()


@needs_sandbox
def test_a_daemon_left_behind_is_killed_and_scored_as_failure():
    token = "cpift-daemon-" + secrets.token_hex(8)
    result = code.run(f"TOKEN = {token!r}\n" + DAEMON, "assert os.path.exists('daemon-started')\n")
    assert not result.passed
    assert result.reason == "failed: left background processes running (killed with the sandbox)"
    assert _processes_with(token) == []


@needs_sandbox
@pytest.mark.slow
def test_endless_loop_times_out_and_its_daemon_dies_with_it():
    token = "cpift-daemon-" + secrets.token_hex(8)
    program = f"TOKEN = {token!r}\n" + DAEMON + "while True:\n    pass\n"
    start = time.monotonic()
    result = code.run(program, "", timeout_s=1.5)
    elapsed = time.monotonic() - start
    assert not result.passed
    assert result.reason == "timeout after 1.5 s"
    assert elapsed < 1.5 + 2.0
    assert _processes_with(token) == []


def test_refuses_without_a_sandbox(monkeypatch):
    monkeypatch.setattr(code, "sandbox_problem", lambda: "no namespaces in this test")
    result = code.run("print('never runs')\n", "")
    assert not result.passed
    assert result.reason.startswith("sandbox unavailable: no namespaces in this test")
    assert "allow_unsandboxed=True" in result.reason


def test_unsandboxed_opt_in_keeps_limits_and_the_group_kill(monkeypatch):
    monkeypatch.setattr(code, "sandbox_problem", lambda: "no namespaces in this test")
    assert code.run("x = 1\n", "assert x == 1\n", allow_unsandboxed=True).passed
    failed = code.run("x = 1\n", "assert x == 2\n", allow_unsandboxed=True)
    assert failed.reason == "failed: AssertionError"
    memory = code.run("b = bytearray(1 << 30)\n", "", memory_mb=256, allow_unsandboxed=True)
    assert memory.reason.startswith("memory limit"), memory


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="timeout_s"):
        code.run("", "", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        code.run("", "", memory_mb=0)
