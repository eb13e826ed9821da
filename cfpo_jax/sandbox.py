"""Running model-written Python: one confined process per call, killed at a wall-clock limit.

    result = run_python("print(6 * 7)", limits=Limits(wall_s=2.0))
    result.ok, result.stdout        # True, "42\\n"

Shared by the Python tool of multi-turn environments and the `code` reward. Thread-safe: call it
from many threads at once (each call owns its process, directory, pipes and user id).

Every call
* writes the code to a new private temporary directory and runs it with a fresh interpreter,
  `python -I -S` (isolated mode, no site-packages: the standard library only), in an empty
  working directory `work/` beside it; the directory is removed afterwards whatever happened;
* gives it an environment built from scratch (PATH, HOME and TMPDIR = the work dir, LANG,
  PYTHONIOENCODING) — nothing of the caller's, so no secrets — and stdin from `stdin_text` or
  empty (end of file at once), never the caller's;
* sets RLIMIT_CPU (`cpu_s`, whole seconds rounded up; SIGKILL one second later), RLIMIT_AS
  (`memory_mb`: an allocation past it raises MemoryError), RLIMIT_FSIZE (`file_mb`), RLIMIT_NPROC
  (`processes`, threads included), RLIMIT_NOFILE (256) and RLIMIT_CORE (0);
* runs in its own session and process group, which is killed (SIGKILL) at `wall_s`;
* reads stdout and stderr with a cap: past `output_bytes` on either the process is killed, so
  no amount of output reaches memory beyond the cap.

What else holds depends on the machine — `isolation()` says which, decided once per process by
a trial run:

"namespaces" (the caller is root and the kernel allows unshare; true on the project's dev box,
    a root container on a Firecracker VM, kernel 6.18): the code runs in new network, mount,
    PID, IPC and UTS namespaces — no network interface but a down loopback, so no socket
    reaches anything, not even 127.0.0.1; its own /proc, so no other process is visible; /root,
    /home, the caller's home and the temporary directories (/tmp, /var/tmp, /dev/shm, /run/lock,
    $TMPDIR) are hidden under empty read-only tmpfs mounts, with the interpreter's prefix bound
    back read-only and the work dir bound back writable; and it runs as an unprivileged user id
    of its own (one of `UID_RANGE`, held with a file lock for the call, so no two concurrent
    runs share one and RLIMIT_NPROC counts exactly this run's processes) with no supplementary
    groups and no-new-privileges (setuid binaries cannot raise it). So it can write nowhere but
    its work dir, cannot signal or inspect the trainer (another uid, another PID namespace), and
    when the run ends, or is killed, the namespace's init exits and the kernel kills every
    process the code started. The rest of the file system is readable as for any unprivileged
    user (world-readable files, e.g. the project's code and data).
"plain" (anything else, e.g. not root): the limits above, its own process group and directory,
    the clean environment, the launcher as its parent; the caller's uid, so it can read and write
    what the caller can (its files, its /proc/<pid>/environ), and as root RLIMIT_NPROC does not
    bind. An audit hook refuses sockets, process creation, signals and ctypes — it stops
    ordinary code, NOT a determined attacker (not a security boundary).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import os
import random
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

_BOOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_boot.py")
# User ids for sandboxed runs: far above any real account (Linux ids are 32-bit; 65534 is nobody).
UID_RANGE = range(1_900_000_000, 1_900_004_096)
_UID_LOCK_DIR = os.path.join(tempfile.gettempdir(), "cfpo-sandbox-uids")
_TRUNCATED = "\n[... output truncated at {} bytes]"
_READ_CHUNK = 65536


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one run.

    wall_s: seconds of real time before the whole process group is killed.
    cpu_s: CPU seconds (RLIMIT_CPU, rounded up to whole seconds).
    memory_mb: address space per process, MiB (RLIMIT_AS); Python itself needs ~30.
    file_mb: largest file the code may write, MiB (RLIMIT_FSIZE).
    processes: processes and threads of the run (RLIMIT_NPROC; see the module docstring).
    output_bytes: bytes kept of stdout and of stderr each; more kills the run.
    """

    wall_s: float = 5.0
    cpu_s: float = 5.0
    memory_mb: int = 1024
    file_mb: int = 16
    processes: int = 8
    output_bytes: int = 65536

    def __post_init__(self):
        for name in ("wall_s", "cpu_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive finite number of seconds; "
                                 f"got {value!r}")
        for name, least in (("memory_mb", 64), ("file_mb", 1), ("processes", 1),
                            ("output_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Limits.{name} must be an integer >= {least}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class Result:
    """What one run did.

    ok: exited with status 0 and hit no limit.
    stdout, stderr: decoded UTF-8 (invalid bytes replaced), each cut at `output_bytes` with a
      marker line appended when cut.
    exit_code: the exit status; -N when killed by signal N; None when the sandbox killed it
      (wall clock, output) before it ended.
    timed_out: the wall-clock limit was hit.
    killed_by: which limit ended it — "wall", "cpu", "output", "memory" (it died of a
      MemoryError: the address-space limit) — or None.
    seconds: wall-clock seconds of the whole call.
    """

    ok: bool
    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    killed_by: str | None
    seconds: float


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not the code's fault)."""


def _rlimits(limits: Limits) -> dict:
    cpu = math.ceil(limits.cpu_s)
    memory = limits.memory_mb * 2**20
    files = limits.file_mb * 2**20
    return {"RLIMIT_CPU": (cpu, cpu + 1), "RLIMIT_AS": (memory, memory),
            "RLIMIT_FSIZE": (files, files), "RLIMIT_NPROC": (limits.processes,) * 2,
            "RLIMIT_NOFILE": (256, 256), "RLIMIT_CORE": (0, 0)}


def _env(work: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work,
            "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}


def _python() -> tuple[str, str]:
    """The base interpreter (not a venv's link to it) and its installation prefix."""
    python = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not python.startswith(prefix + os.sep):
        raise SandboxError(f"the interpreter {python} lies outside its prefix {prefix}")
    return python, prefix


def _hidden_dirs(base: str) -> list[str]:
    dirs = ["/root", "/home", os.path.expanduser("~"), "/tmp", "/var/tmp", "/dev/shm",
            "/run/lock", tempfile.gettempdir(), os.path.dirname(base)]
    return list(dict.fromkeys(os.path.realpath(d) for d in dirs if d != "/"))


class _UidLease:
    """A user id of UID_RANGE held by an exclusive flock (across threads and processes)."""

    def __init__(self):
        os.makedirs(_UID_LOCK_DIR, mode=0o700, exist_ok=True)
        info = os.lstat(_UID_LOCK_DIR)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise SandboxError(f"{_UID_LOCK_DIR} must be a directory owned by uid {os.geteuid()} "
                               "with mode 0700")
        start = random.randrange(len(UID_RANGE))
        for k in range(len(UID_RANGE)):
            uid = UID_RANGE[(start + k) % len(UID_RANGE)]
            fd = os.open(os.path.join(_UID_LOCK_DIR, str(uid)), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return
        raise SandboxError(f"all {len(UID_RANGE)} sandbox user ids are in use")

    def release(self):
        _kill_user(self.uid)  # nothing of a run may outlive it under an id handed out again
        os.close(self._fd)


def _kill_user(uid: int, timeout_s: float = 2.0):
    """SIGKILL every process of `uid` until none is left (normally there is none: a PID
    namespace's processes die with its init)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.stat(f"/proc/{name}").st_uid == uid:
                        alive.append(int(name))
                except FileNotFoundError:
                    continue
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise SandboxError(f"processes {alive} of sandbox uid {uid} survive SIGKILL")
        time.sleep(0.01)


_isolation: str | None = None
_isolation_lock = threading.Lock()


def isolation() -> str:
    """"namespaces" or "plain" (see the module docstring): what confines runs in this process."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = "plain"
            if os.geteuid() == 0 and sys.platform.startswith("linux"):
                try:
                    probe = _run("import os; print(os.getuid())", None, Limits(), "namespaces")
                    if probe.ok and probe.stdout.strip() != "0":
                        _isolation = "namespaces"
                except (SandboxError, OSError):
                    pass
        return _isolation


def run_python(code: str, *, stdin_text: str | None = None, limits: Limits = Limits()) -> Result:
    """Runs `code` as a Python script in the sandbox and returns what happened.

    code: the script's source. stdin_text: its standard input (None: empty). limits: `Limits`.
    Never raises for anything the code does; raises SandboxError when the sandbox cannot start,
    TypeError/ValueError for bad arguments.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str; got {type(code).__name__}")
    if stdin_text is not None and not isinstance(stdin_text, str):
        raise TypeError(f"stdin_text must be a str or None; got {type(stdin_text).__name__}")
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be a sandbox.Limits; got {type(limits).__name__}")
    return _run(code, stdin_text, limits, isolation())


def _run(code: str, stdin_text: str | None, limits: Limits, mode: str) -> Result:
    started = time.monotonic()
    base = tempfile.mkdtemp(prefix="cfpo-sandbox-")
    lease = None
    try:
        work, script = os.path.join(base, "work"), os.path.join(base, "main.py")
        os.mkdir(work, 0o700)
        with open(script, "w", encoding="utf-8") as f:
            f.write(code)
        with open(os.path.join(base, "stdin"), "w+", encoding="utf-8") as stdin:
            stdin.write(stdin_text or "")
            stdin.seek(0)
            python, prefix = _python()
            cfg = {"mode": mode, "python": python, "python_prefix": prefix, "work": work,
                   "script": script, "env": _env(work), "rlimits": _rlimits(limits)}
            if mode == "namespaces":
                lease = _UidLease()
                os.chown(work, lease.uid, lease.uid)
                cfg.update(uid=lease.uid, gid=lease.uid, hide=_hidden_dirs(base))
            return _supervise(cfg, stdin, limits, started)
    finally:
        if lease is not None:
            lease.release()
        shutil.rmtree(base, ignore_errors=True)


def _supervise(cfg: dict, stdin, limits: Limits, started: float) -> Result:
    status_r, status_w = os.pipe()
    cfg["status_fd"] = status_w
    with os.fdopen(status_r, "rb") as status_file:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _BOOT, json.dumps(cfg)], stdin=stdin,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cfg["work"], env=cfg["env"],
                pass_fds=(status_w,), start_new_session=True)
        finally:
            os.close(status_w)
        try:
            outputs, killed_by = _read_capped(proc, limits, started)
        finally:  # also on KeyboardInterrupt or a reward worker's deadline in the caller's thread
            _kill_group(proc)
        status = status_file.read().decode(errors="replace").split()
    if status[:1] == ["error"]:
        raise SandboxError(f"the sandbox could not start: {' '.join(status[1:])}")
    exit_code = None
    if killed_by is None:
        if len(status) != 4:
            raise SandboxError(f"the sandbox's launcher ended without a status "
                               f"(exit code {proc.returncode})")
        kind, number, cpu = status[0], int(status[1]), float(status[3])
        exit_code = -number if kind == "signal" else number
        # SIGXCPU: the soft limit; SIGKILL past the hard one (when SIGXCPU is ignored). rusage
        # samples CPU time more coarsely than the limit's accounting, hence the 0.9.
        if exit_code == -signal.SIGXCPU or (
                exit_code == -signal.SIGKILL and cpu >= 0.9 * math.ceil(limits.cpu_s)):
            killed_by = "cpu"
        elif exit_code != 0 and outputs[1].rstrip().endswith(b"MemoryError"):
            killed_by = "memory"
    stdout, stderr = (_decode(data, limits.output_bytes) for data in outputs)
    return Result(ok=exit_code == 0 and killed_by is None, stdout=stdout, stderr=stderr,
                  exit_code=exit_code, timed_out=killed_by == "wall", killed_by=killed_by,
                  seconds=time.monotonic() - started)


def _read_capped(proc, limits: Limits, started: float):
    """Both pipes until they close, the wall clock runs out or one passes the cap: the bytes read
    (at most output_bytes + one chunk each) and which limit ended it."""
    data = [bytearray(), bytearray()]
    streams = {proc.stdout.fileno(): 0, proc.stderr.fileno(): 1}
    deadline = started + limits.wall_s
    with selectors.DefaultSelector() as selector:
        for fd in streams:
            selector.register(fd, selectors.EVENT_READ)
        while streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return data, "wall"
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, _READ_CHUNK)
                if not chunk:
                    selector.unregister(key.fd)
                    del streams[key.fd]
                    continue
                data[streams[key.fd]] += chunk
                if len(data[streams[key.fd]]) > limits.output_bytes:
                    return data, "output"
    return data, None  # both closed: the launcher has ended, its status is written


def _kill_group(proc):
    """SIGKILL to the launcher's process group (before reaping it: its id cannot be reused), which
    holds the namespace's init; then reap."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def _decode(data: bytes, cap: int) -> str:
    text = bytes(data[:cap]).decode("utf-8", errors="replace")
    return text + _TRUNCATED.format(cap) if len(data) > cap else text
