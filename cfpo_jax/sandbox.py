"""Running model-written Python: a confined, killable run per call, and verdicts it cannot forge.

    result = run_python("print(6 * 7)", limits=Limits(wall_s=2.0))
    result.ok, result.stdout                    # True, "42\\n"
    v = run_verdict(code, {"test": ..., "entry_point": ...})   # or {"tests": "assert ..."}
    v.passed, v.why

`run_python` serves the Python tool of multi-turn environments; `run_verdict` the `code` reward.
Thread-safe: call them from many threads at once (each call owns its processes, cgroups, user id).

"bwrap" isolation (the caller is root on Linux and bubblewrap is installed; `isolation()`
decides once, by a trial run, and logs what holds). Every call
* gets a uid of its own (one of `UID_RANGE`, held with a file lock for the call, freed only when
  no process of it is left) and cgroups of its own (sandbox_cgroups): `memory_mb` for all its
  processes together (memfd, shared memory and the files it writes included; past it the
  kernel's OOM killer ends it), `processes` for its processes and threads together (a 32-worker
  thread pool fits the default) — where no cgroup controller is writable, RLIMIT_AS and
  RLIMIT_NPROC per process stand in, and `isolation()` says so;
* runs in bubblewrap's new user, mount, PID, network, IPC, UTS and cgroup namespaces with a
  minimal root (sandbox_bwrap): /usr (and its /bin, /lib, ... links), ld.so.cache and the
  interpreter's prefix, read-only; a fresh /proc; a /dev of its own (null, zero, random, ..., a
  private devpts, so no host pty); /work (the working directory), /tmp and /dev/shm writable,
  all three on ONE tmpfs of `disk_mb` bytes and `files` inodes that lives in the run's mount
  namespace and is dropped whole when its last process ends (nothing ever reaches the disk;
  nothing is left to delete); /sandbox, read-only, with the code. No host path is in it (no
  /tmp, /run, /home, /etc of the host), so no path UNIX socket of the host is reachable, and the
  network namespace has only a loopback that is down, so neither is an abstract one, nor any
  network;
* loads a seccomp filter (compiled by libseccomp's Python binding, pyseccomp or python3-seccomp)
  that refuses the kernel keyring (keyctl, add_key, request_key), new user namespaces (unshare,
  clone with CLONE_NEWUSER, clone3), io_uring, sockets of any family but AF_UNIX, mounts, bpf,
  perf events, userfaultfd, ptrace and module or kexec loading;
* sets RLIMIT_CPU (`cpu_s`, whole seconds rounded up; SIGKILL one second later), RLIMIT_FSIZE
  (`file_mb`), RLIMIT_NOFILE (256), RLIMIT_CORE (0); no-new-privileges;
* is killed at `wall_s` (every process of its cgroup), its output read with a cap
  (`output_bytes` each of stdout and stderr; past it the run is killed).
Nothing a run writes or registers is visible to a later one: its files die with its tmpfs, its
processes with its cgroup and PID namespace, and keys, user namespaces and sockets out are
refused.

A verdict (`run_verdict`) runs the candidate's code in such a sandbox as a server of its
functions (sandbox_server), and the test's assertions in the launcher, a process outside the
sandbox: the launcher calls the candidate's functions through a proxy that carries only plain
data (None, bool, int, float, complex, str, bytes, and lists, tuples, dicts and sets of them)
both ways over two pipes, with a strict decoder (sandbox_wire; no pickle). The test's source and
expected values reach the launcher only after the candidate's process has been started, and
never reach the sandbox: not its files, argv, environment, descriptors or memory. A function
whose result is not plain data fails that call. See sandbox_verdict. The test itself runs with
the caller's privileges: tests are trusted like the rest of the run's configuration.

Each call's launcher (sandbox_boot) is forked by a fork server started once per process, not
started as a new interpreter; the caller holds it by a pidfd, so killing it never hits a reused
pid.

"plain" isolation (anything else, e.g. not root, no bubblewrap): limits as rlimits per process
(RLIMIT_AS for memory_mb, RLIMIT_NPROC for processes), its own directory (removed afterwards)
and the caller's uid; an audit hook refuses sockets, process creation, signals and ctypes — it
stops ordinary code, NOT a determined attacker, and the verdict is not out of its reach either.
`isolation()` says which protections hold; `configure(strict=True)` (the config's
`rewards.code_strict`, through `from_config`) makes every call refuse to run (SandboxRefused)
without the full set.
"""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import json
import logging
import math
import os
import random
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

from cfpo_jax import sandbox_bwrap, sandbox_cgroups, sandbox_wire

_log = logging.getLogger(__name__)
_HERE = os.path.dirname(os.path.abspath(__file__))
_BOOT = os.path.join(_HERE, "sandbox_boot.py")
# User ids for sandboxed runs: far above any real account (Linux ids are 32-bit; 65534 is nobody).
UID_RANGE = range(1_900_000_000, 1_900_004_096)
_UID_LOCK_DIR = os.path.join(tempfile.gettempdir(), "cfpo-sandbox-uids")
_TRUNCATED = "\n[... output truncated at {} bytes]"
_READ_CHUNK = 65536
_STAGE = "/tmp"  # where a run's tmpfs is mounted, in the run's own mount namespace only
_VERDICT_MEMORY = 2 << 30  # the launcher's address space while it judges
# Every protection of the bwrap isolation; `isolation().protections` lists those in force.
FULL = ("namespaces", "minimal_root", "private_devpts", "unprivileged_uid", "seccomp",
        "cgroup_memory", "cgroup_pids", "disk_quota", "separate_verdict")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one run.

    wall_s: seconds of real time before every process of the run is killed.
    cpu_s: CPU seconds per process (RLIMIT_CPU, rounded up to whole seconds).
    memory_mb: MiB of memory for all the run's processes together, shared memory and the files
      it writes included (a cgroup; "plain" isolation: address space per process, RLIMIT_AS).
    disk_mb: MiB that /work, /tmp and /dev/shm hold together (one tmpfs).
    files: files and directories that /work, /tmp and /dev/shm hold together (its inodes).
    file_mb: largest file the code may write, MiB (RLIMIT_FSIZE).
    processes: processes and threads of the run together (a cgroup; "plain": RLIMIT_NPROC).
    output_bytes: bytes kept of stdout and of stderr each; more kills the run.
    """

    wall_s: float = 5.0
    cpu_s: float = 5.0
    memory_mb: int = 1024
    disk_mb: int = 64
    files: int = 16384
    file_mb: int = 16
    processes: int = 64
    output_bytes: int = 65536

    def __post_init__(self):
        for name in ("wall_s", "cpu_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive finite number of seconds; "
                                 f"got {value!r}")
        for name, least in (("memory_mb", 64), ("disk_mb", 1), ("files", 64), ("file_mb", 1),
                            ("processes", 4), ("output_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Limits.{name} must be an integer >= {least}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class Result:
    """What one run did.

    ok: exited with status 0 and hit no limit.
    stdout, stderr: decoded UTF-8 (invalid bytes replaced), each cut at `output_bytes` with a
      marker line appended when cut.
    exit_code: the exit status (bwrap: 128 + N when killed by signal N, as a shell says it;
      "plain": -N); None when the sandbox killed it (wall clock, output) before it ended.
    timed_out: the wall-clock limit was hit.
    killed_by: which limit ended it — "wall", "cpu", "output", "memory" (the cgroup's OOM killer,
      or a MemoryError) — or None.
    seconds: wall-clock seconds of the whole call.
    memory_peak_mb: the most memory its processes held together, MiB, as its cgroup counted it
      (shared memory and its files included); None without a memory cgroup.
    """

    ok: bool
    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    killed_by: str | None
    seconds: float
    memory_peak_mb: float | None = None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """passed: the test ran to its end against the candidate's functions. why: if not, why (an
    assertion, the candidate's exception, its code failing, the wall clock). seconds: the call."""

    passed: bool
    why: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class Isolation:
    """What confines runs in this process: mode "bwrap" or "plain", the protections of `FULL`
    in force, and why the others are missing."""

    mode: str
    protections: tuple[str, ...]
    why: str = ""
    cgroup_roots: tuple[str, ...] = ()  # where the runs' cgroups are made (and removed)

    @property
    def missing(self) -> tuple[str, ...]:
        return tuple(p for p in FULL if p not in self.protections)

    @property
    def full(self) -> bool:
        return not self.missing

    def __str__(self):
        text = f"sandbox isolation {self.mode}: {', '.join(self.protections) or 'none'} in force"
        return text + (f"; MISSING {', '.join(self.missing)} ({self.why})" if self.missing
                       else "")


class SandboxError(RuntimeError):
    """The sandbox itself could not run (not the code's fault)."""


class SandboxRefused(SandboxError):
    """Strict: the isolation lacks a protection of `FULL`, so no code runs."""


_strict = False


def configure(*, strict: bool | None = None, mode: str | None = None):
    """strict=True: every later call raises SandboxRefused unless `isolation().full`.
    mode="plain": use the "plain" isolation from now on (e.g. where bubblewrap misbehaves);
    mode="auto": probe again at the next call, as at start."""
    global _strict, _setup
    if strict is not None:
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool; got {strict!r}")
        _strict = strict
    if mode is not None:
        if mode not in ("auto", "plain"):
            raise ValueError(f"mode must be 'auto' or 'plain'; got {mode!r}")
        with _setup_lock:
            _setup = None if mode == "auto" else _Setup(
                Isolation("plain", (), "configured: mode='plain'"))


def from_config(config) -> Isolation | None:
    """For a training run whose rewards (`code`) or tools (`python`) run model-written code: the
    strict setting of `rewards.code_strict`, and the isolation probed and logged now rather than
    at the first rollout — strict without the full set raises SandboxRefused here. None (and
    nothing done) for a run that runs no code."""
    if "code" not in config.rewards.fns and "python" not in config.env.tools:
        return None
    configure(strict=config.rewards.code_strict)
    setup = _get_setup()
    _check_strict(setup)
    return setup.isolation


# ---------------------------------------------------------------------------------------------
# Setting up: the interpreter, the probe, the bookkeeping of failed cleanups.


_cleanup_failures = 0
_cleanup_lock = threading.Lock()


def cleanup_failures() -> int:
    """How many runs' cleanup failed (each logged) in this process so far."""
    return _cleanup_failures


def _count_cleanup_failure(what: str):
    global _cleanup_failures
    with _cleanup_lock:
        _cleanup_failures += 1
    _log.warning("sandbox cleanup failed: %s", what)


def _python() -> tuple[str, str]:
    """The base interpreter (not a venv's link to it) and its installation prefix."""
    python = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    if not python.startswith(prefix + os.sep):
        raise SandboxError(f"the interpreter {python} lies outside its prefix {prefix}")
    return python, prefix


@dataclasses.dataclass(frozen=True)
class _Setup:
    isolation: Isolation
    bwrap: tuple[str, ...] = ()
    python_bind: bool = False
    seccomp: bytes = b""
    cgroup_roots: tuple[tuple[str, str], ...] = ()


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
        """Frees the uid once no process of it is left (one may still be exiting when its
        cgroup is already empty); a uid handed out again carries nothing of this run."""
        try:
            _kill_user(self.uid)
        except SandboxError as e:
            _count_cleanup_failure(str(e))  # the uid stays held: never handed out again
            return
        os.close(self._fd)


def _kill_user(uid: int, timeout_s: float = 5.0):
    """SIGKILL every process of `uid` until none is left."""
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
        time.sleep(0.005)


_setup: _Setup | None = None
_setup_lock = threading.Lock()


def isolation() -> Isolation:
    """What confines runs in this process (decided once, by a trial run; logged once)."""
    return _get_setup().isolation


def _get_setup() -> _Setup:
    global _setup
    with _setup_lock:
        if _setup is None:
            _setup = _probe()
            log = _log.info if _setup.isolation.full else _log.warning
            log("%s", _setup.isolation)
        return _setup


def _probe() -> _Setup:
    def fallback(why: str) -> _Setup:
        return _Setup(Isolation("plain", (), why))

    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return fallback("needs root on Linux")
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return fallback("bubblewrap is not installed: apt-get install bubblewrap")
    missing, bpf = [], b""
    try:
        bpf = sandbox_bwrap.seccomp_bpf()
    except Exception as e:  # noqa: BLE001  (bwrap without the filter: said, and strict refuses)
        missing.append(("seccomp", f"no libseccomp binding ({type(e).__name__}: {e}): pip "
                                   "install pyseccomp, or apt-get install python3-seccomp"))
    try:
        roots = sandbox_cgroups.roots()
    except OSError as e:
        roots = {}
        _log.warning("cgroups unreadable: %s", e)
    python, prefix = _python()
    argv, python_bind = sandbox_bwrap.argv(bwrap, prefix, seccomp=bool(bpf))
    failure = ""
    for attempt in (roots, {}):  # without cgroups if a run in them fails (e.g. v2 delegation)
        lacking = missing + [(f"cgroup_{c}", f"no usable {c} cgroup controller")
                             for c in ("memory", "pids") if c not in attempt]
        why = "; ".join(filter(None, [failure, *dict.fromkeys(w for _, w in lacking)]))
        setup = _Setup(Isolation("bwrap", tuple(p for p in FULL if p not in dict(lacking)), why,
                                 tuple(attempt.values())),
                       tuple(argv), python_bind, bpf, tuple(attempt.items()))
        try:
            probe = _run({"main.py": "import os; print(os.getuid())"}, "main.py", "", None,
                         Limits(), setup)
            if probe.ok and probe.stdout.strip().isdigit() and int(probe.stdout) in UID_RANGE:
                return setup
            failure = f"the trial run failed: {probe}"
        except (SandboxError, OSError) as e:
            failure = f"the trial run failed: {e}"
        if not attempt:
            break
    return fallback(failure)


# ---------------------------------------------------------------------------------------------
# Runs.


def _check_strict(setup: _Setup):
    if _strict and not setup.isolation.full:
        raise SandboxRefused(f"strict sandbox: refusing to run without the full set of "
                           f"protections; {setup.isolation}")


def run_python(code: str, *, stdin_text: str | None = None, limits: Limits = Limits()) -> Result:
    """Runs `code` as a Python script in the sandbox and returns what happened.

    code: the script's source. stdin_text: its standard input (None: empty). limits: `Limits`.
    Never raises for anything the code does; raises SandboxError when the sandbox cannot start
    (or, strict, lacks a protection), TypeError/ValueError for bad arguments.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str; got {type(code).__name__}")
    if stdin_text is not None and not isinstance(stdin_text, str):
        raise TypeError(f"stdin_text must be a str or None; got {type(stdin_text).__name__}")
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be a sandbox.Limits; got {type(limits).__name__}")
    setup = _get_setup()
    _check_strict(setup)
    return _run({"main.py": code}, "main.py", stdin_text or "", None, limits, setup)


def run_verdict(code: str, spec: dict, *, limits: Limits = Limits()) -> Verdict:
    """Judges the candidate's `code` by the test in `spec` (see sandbox_verdict): {"test": the
    source defining check(candidate), "entry_point": the function's name, "prompt": optional
    trusted source run before the test} or {"tests": assert statements}. Never raises for
    anything the code does; SandboxError when the sandbox cannot start."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str; got {type(code).__name__}")
    if spec.get("test") is None and not isinstance(spec.get("tests"), str):
        raise ValueError(f"spec needs 'test' and 'entry_point', or 'tests'; got keys "
                         f"{sorted(spec)}")
    if spec.get("test") is not None and not spec.get("entry_point"):
        raise ValueError("spec's 'test' needs an 'entry_point'")
    setup = _get_setup()
    _check_strict(setup)
    files = {"solution.py": code, "server.py": _source("sandbox_server.py"),
             "wire.py": _source("sandbox_wire.py")}
    started = time.monotonic()
    result = _run(files, "server.py", "", spec, limits, setup)
    if result.killed_by is not None:
        return Verdict(False, f"killed by the {result.killed_by} limit",
                       time.monotonic() - started)
    status = result.stdout  # _run puts the launcher's status line here for a verdict
    if status == "verdict pass":
        return Verdict(True, "", time.monotonic() - started)
    why = status.removeprefix("verdict fail ").strip() or "the launcher ended without a verdict"
    return Verdict(False, why, time.monotonic() - started)


_sources: dict[str, str] = {}


def _source(name: str) -> str:
    if name not in _sources:
        with open(os.path.join(_HERE, name), encoding="utf-8") as f:
            _sources[name] = f.read()
    return _sources[name]


def _rlimits(limits: Limits, cgroups: tuple[str, ...]) -> dict:
    """The run's rlimits; per process, memory and processes only where no cgroup bounds them."""
    cpu = math.ceil(limits.cpu_s)
    files = limits.file_mb * 2**20
    rlimits = {"RLIMIT_CPU": (cpu, cpu + 1), "RLIMIT_FSIZE": (files, files),
               "RLIMIT_NOFILE": (256, 256), "RLIMIT_CORE": (0, 0)}
    if "memory" not in cgroups:
        rlimits["RLIMIT_AS"] = (limits.memory_mb * 2**20,) * 2
    if "pids" not in cgroups:
        rlimits["RLIMIT_NPROC"] = (limits.processes,) * 2
    return rlimits


def _run(files: dict, entry: str, stdin_text: str, spec: dict | None, limits: Limits,
         setup: _Setup) -> Result:
    started = time.monotonic()
    mode = setup.isolation.mode
    python, prefix = _python()
    cfg = {"mode": mode, "python": python, "files": files, "entry": entry, "stdin": stdin_text,
           "quiet": spec is not None, "wall_s": limits.wall_s,
           "rlimits": _rlimits(limits, tuple(c for c, _ in setup.cgroup_roots)),
           "verdict_memory": _VERDICT_MEMORY, "env": sandbox_bwrap.ENV}
    lease = cgroups = stage = None
    try:
        if mode == "bwrap":
            lease = _UidLease()
            cgroups = sandbox_cgroups.RunCgroups(dict(setup.cgroup_roots), limits.memory_mb << 20,
                                                   limits.processes)
            argv = list(setup.bwrap) + ["--uid", str(lease.uid), "--gid", str(lease.uid)]
            cfg.update(uid=lease.uid, stage=_STAGE, disk_bytes=limits.disk_mb << 20,
                       inodes=limits.files, seccomp=setup.seccomp.hex(),
                       cgroup_procs=cgroups.procs, python_bind=prefix if setup.python_bind
                       else "", bwrap=argv + ["--", python, "-I", "-S", f"/sandbox/{entry}"],
                       env={"PATH": "/usr/bin:/bin"})
        else:
            stage = tempfile.mkdtemp(prefix="cfpo-sandbox-")
            work = os.path.join(stage, "work")
            cfg.update(stage=stage, env=dict(sandbox_bwrap.ENV, HOME=work, TMPDIR=work))
        result = _supervise(cfg, spec, limits, started, cgroups)
    finally:
        if cgroups is not None and (error := cgroups.close()):
            _count_cleanup_failure(error)
        if lease is not None:
            lease.release()
        if stage is not None:
            _remove(stage)
    return result


def _remove(path: str):
    """Removes the "plain" run's directory; logs and counts a failure instead of raising (deep
    trees make shutil.rmtree recurse past Python's limit)."""
    try:
        shutil.rmtree(path)
    except (OSError, RecursionError):
        done = subprocess.run(["rm", "-rf", "--one-file-system", path], capture_output=True)
        if done.returncode != 0 or os.path.exists(path):
            _count_cleanup_failure(f"{path}: {done.stderr.decode(errors='replace')[:200]}")


class _ForkServer:
    """The launchers' fork server (sandbox_boot.serve): started on first use in each process
    (and again after a fork or its death), shared by all threads."""

    _lock = threading.Lock()
    _instance: _ForkServer | None = None

    def __init__(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", _BOOT, str(theirs.fileno())],
                stdin=subprocess.DEVNULL, cwd="/", env={"PATH": "/usr/bin:/bin"},
                pass_fds=(theirs.fileno(),), start_new_session=True)
        self.sock, self.owner = ours, os.getpid()
        atexit.register(self.close)

    def close(self):
        """Ends the server (it exits when its socket closes) and reaps it."""
        self.sock.close()
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @classmethod
    def spawn(cls, fds: list[int]) -> int:
        """A new launcher with stdin, stdout, stderr, status = `fds`: its pidfd."""
        with cls._lock:
            for attempt in (0, 1):
                server = cls._instance
                if server is None or server.owner != os.getpid() or server.proc.poll() is not None:
                    server = cls._instance = cls()
                try:
                    socket.send_fds(server.sock, [b"1"], fds)
                    message, pidfds, _, _ = socket.recv_fds(server.sock, 1, 1)
                    if message == b"1" and len(pidfds) == 1:
                        return pidfds[0]
                except OSError:
                    pass
                server.proc.kill()
                server.close()
                cls._instance = None
            raise SandboxError("the sandbox's fork server does not answer")


def _supervise(cfg: dict, spec: dict | None, limits: Limits, started: float,
               cgroups: sandbox_cgroups.RunCgroups | None) -> Result:
    pipes = [os.pipe() for _ in range(4)]  # stdin, stdout, stderr, status
    theirs = [pipes[0][0], pipes[1][1], pipes[2][1], pipes[3][1]]
    stdin, stdout, stderr, status_r = pipes[0][1], pipes[1][0], pipes[2][0], pipes[3][0]
    try:
        pidfd = _ForkServer.spawn(theirs)
    except BaseException:
        for fd in (stdin, stdout, stderr, status_r):
            os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    try:
        try:
            sandbox_wire.write_frame(stdin, json.dumps(cfg).encode())
            if spec is not None:  # read by the launcher only after the candidate started
                sandbox_wire.write_frame(stdin, json.dumps(spec).encode())
        except BrokenPipeError:
            pass  # the launcher ended early: its status says why
        finally:
            os.close(stdin)
        try:
            outputs, killed_by = _read_capped((stdout, stderr), limits, started)
        finally:  # also on KeyboardInterrupt or a reward worker's deadline in the caller's thread
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it has ended
            if cgroups is not None:
                try:
                    cgroups.kill()
                except sandbox_cgroups.CgroupError as e:
                    raise SandboxError(str(e)) from None
        with os.fdopen(status_r, "rb", closefd=False) as status_file:
            status = status_file.read().decode(errors="replace").strip()
    finally:
        for fd in (pidfd, stdout, stderr, status_r):
            os.close(fd)
    if status.startswith("error"):
        raise SandboxError(f"the sandbox could not start: {status[6:]} "
                           f"{outputs[1].decode(errors='replace')[-2000:]}")
    oom = cgroups is not None and cgroups.oom_kills() > 0
    if spec is not None:  # a verdict: the launcher's status line is all there is to say
        if killed_by is None and oom:
            killed_by = "memory"
        return Result(ok=status == "verdict pass", stdout=status, stderr="", exit_code=None,
                      timed_out=killed_by == "wall",
                      killed_by=killed_by if not status.startswith("verdict") else None,
                      seconds=time.monotonic() - started)
    exit_code = None
    if killed_by is None:
        words = status.split()
        if len(words) != 4 or words[0] != "exit":
            raise SandboxError(f"the sandbox's launcher ended without a status: {status!r}")
        exit_code, cpu = int(words[1]), float(words[3])
        signalled = -exit_code if exit_code < 0 else exit_code - 128 if exit_code > 128 else 0
        # SIGXCPU: the soft limit; SIGKILL past the hard one (when SIGXCPU is ignored), not by
        # the OOM killer, after at least cpu_s (bwrap's own rusage does not include the code's,
        # so the wall clock stands in for it). rusage samples CPU time more coarsely than the
        # limit's accounting, hence the 0.9.
        if signalled == signal.SIGXCPU or (signalled == signal.SIGKILL and not oom and max(
                cpu, time.monotonic() - started) >= 0.9 * math.ceil(limits.cpu_s)):
            killed_by = "cpu"
        elif oom or (exit_code != 0 and outputs[1].rstrip().endswith(b"MemoryError")):
            killed_by = "memory"
    stdout, stderr = (_decode(data, limits.output_bytes) for data in outputs)
    return Result(ok=exit_code == 0 and killed_by is None, stdout=stdout, stderr=stderr,
                  exit_code=exit_code, timed_out=killed_by == "wall", killed_by=killed_by,
                  seconds=time.monotonic() - started,
                  memory_peak_mb=cgroups.memory_peak_mb() if cgroups is not None else None)


def _read_capped(fds: tuple[int, int], limits: Limits, started: float):
    """Both pipes until they close, the wall clock runs out or one passes the cap: the bytes read
    (at most output_bytes + one chunk each) and which limit ended it."""
    data = [bytearray(), bytearray()]
    streams = {fds[0]: 0, fds[1]: 1}
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
    return data, None  # both closed: the run has ended, its status is written


def _decode(data: bytes, cap: int) -> str:
    text = bytes(data[:cap]).decode("utf-8", errors="replace")
    return text + _TRUNCATED.format(cap) if len(data) > cap else text
