"""The child side of ``cpift_jax.evals.code``: the sandbox's supervisor and the program runner.

Run by path as ``python -I -B sandbox_child.py sandbox|plain SETUP_JSON`` (inside ``unshare`` for
``sandbox``), so it imports only the standard library; ``code.run`` builds the command and reads
the outcome from the exit status and the markers below. What the supervisor sets up (read-only
mounts, a minimal ``/dev``, the unprivileged uid, resource limits) is described in
``cpift_jax.evals.code``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import resource
import stat
import sys
import traceback

PASS_MARKER = "cpift-sandbox-pass:"
SETUP_FAILED = "sandbox setup failed:"
LEFTOVER = "sandbox: the program left processes running:"
SETUP_EXIT = 125  # supervisor could not build the sandbox
LEFTOVER_EXIT = 126  # program finished but left processes behind (they die with the namespace)
MEMORY_EXIT = 3  # the program raised MemoryError (the address-space limit)

MOUNT_SETATTR_NR = {"x86_64": 442, "aarch64": 442}
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 0x1, 0x2
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
_PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 4, 38
_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9)}


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _libc_call(libc, what: str, result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _build_sandbox(setup: dict) -> None:
    """Runs as root inside the fresh namespaces: read-only file system except the work directory,
    minimal /dev, hidden non-traversable directories, then drop to the unprivileged uid."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]

    def mount(source, target, fstype, flags, data=None):
        enc = lambda s: None if s is None else s.encode()  # noqa: E731
        _libc_call(libc, f"mount {target}",
                   libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)))

    def setattr_(path, attr_set, attr_clr, recursive):
        attr = _MountAttr(attr_set, attr_clr, 0, 0)
        nr = MOUNT_SETATTR_NR[platform.machine()]
        _libc_call(libc, f"mount_setattr {path}", libc.syscall(
            ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(path.encode()),
            ctypes.c_uint(_AT_RECURSIVE if recursive else 0), ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr))))

    os.umask(0o022)
    mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    for top, keep in setup["hidden"].items():
        fds = [os.open(path, os.O_PATH | os.O_DIRECTORY) for path in keep]
        mount("tmpfs", top, "tmpfs", _MS_NOSUID | _MS_NODEV, "mode=0755,size=64k")
        for path, fd in zip(keep, fds):
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
            os.close(fd)
    mount("tmpfs", "/dev", "tmpfs", _MS_NOSUID | _MS_NOEXEC, "mode=0755,size=64k")
    for name, (major, minor) in _DEVICES.items():
        os.mknod(f"/dev/{name}", stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(f"/dev/{name}", 0o666)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    workdir = setup["workdir"]
    mount(workdir, workdir, None, _MS_BIND)
    setattr_("/", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, recursive=True)
    setattr_(workdir, 0, _MOUNT_ATTR_RDONLY, recursive=False)
    os.chdir(workdir)
    os.setgroups([])
    os.setgid(setup["gid"])
    os.setuid(setup["uid"])
    _libc_call(libc, "prctl(NO_NEW_PRIVS)", libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    _libc_call(libc, "prctl(DUMPABLE)", libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0))
    if os.getuid() == 0 or os.geteuid() == 0:
        raise OSError(errno.EPERM, "still root after setuid")


def _supervise(setup: dict) -> None:
    """PID-namespace init: build the sandbox, fork the program, reap everything, and report the
    program's status (a signal as 128 + N); exiting tears the namespace down."""
    try:
        _build_sandbox(setup)
    except Exception as e:  # noqa: BLE001 -- any setup failure means: refuse to run the program
        os.write(2, f"{SETUP_FAILED} {type(e).__name__}: {e}\n".encode())
        os._exit(SETUP_EXIT)
    child = os.fork()
    if child == 0:
        _run_program(setup["limits"])
    status = None
    while status is None:
        pid, wstatus = os.waitpid(-1, 0)
        if pid == child:
            status = wstatus
    while True:  # reap orphans that already exited
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    code = os.waitstatus_to_exitcode(status)
    code = 128 - code if code < 0 else code
    left = [p for p in os.listdir("/proc") if p.isdigit() and p != "1"]
    if left and code == 0:
        os.write(2, f"{LEFTOVER} {len(left)}\n".encode())
        code = LEFTOVER_EXIT
    os._exit(code)


def _set_limits(limits: dict) -> None:
    for res, value, hard in (
            (resource.RLIMIT_CPU, limits["cpu_s"], limits["cpu_s"] + 1),
            (resource.RLIMIT_AS, limits["memory_bytes"], None),
            (resource.RLIMIT_DATA, limits["memory_bytes"], None),
            (resource.RLIMIT_FSIZE, limits["file_bytes"], None),
            (resource.RLIMIT_NPROC, limits["nproc"], None),
            (resource.RLIMIT_NOFILE, limits["nofile"], None),
            (resource.RLIMIT_CORE, 0, None)):
        resource.setrlimit(res, (value, value if hard is None else hard))


def _run_program(limits: dict) -> None:
    """Execute program.py then test.py (from the current directory) in one namespace; never
    returns."""
    exit_, write, flush_streams = os._exit, os.write, _flush_streams
    try:
        _set_limits(limits)
        marker = f"\n{PASS_MARKER}{sys.stdin.readline().strip()}\n".encode()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdin = open(os.devnull)
        sources = []
        for name in ("program.py", "test.py"):
            with open(name, encoding="utf-8") as f:
                sources.append((name, f.read()))
    except BaseException as e:  # noqa: BLE001
        write(2, f"{SETUP_FAILED} {type(e).__name__}: {e}\n".encode())
        exit_(SETUP_EXIT)
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        for name, source in sources:
            exec(compile(source, name, "exec"), namespace)  # noqa: S102 -- the point of the sandbox
    except MemoryError:
        namespace.clear()
        write(2, b"MemoryError\n")
        exit_(MEMORY_EXIT)
    except BaseException:  # noqa: BLE001 -- SystemExit from the program is a failure too
        traceback.print_exc()
        flush_streams()
        exit_(1)
    flush_streams()
    write(1, marker)
    exit_(0)  # skip atexit handlers and non-daemon threads of the program


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 -- the program may have closed or replaced them
            pass


def _child_main(argv: list[str]) -> None:
    mode, setup = argv[0], json.loads(argv[1])
    if mode == "sandbox":
        _supervise(setup)
    elif mode == "plain":
        _run_program(setup["limits"])
    raise SystemExit(f"unknown mode {mode!r}: expected 'sandbox' or 'plain'")


if __name__ == "__main__":
    _child_main(sys.argv[1:])
