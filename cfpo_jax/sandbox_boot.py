"""The launcher of one sandboxed run, forked by the fork server (`serve`, started once per caller
by `cfpo_jax.sandbox` as `python -I -S <this file> <socket fd>`): it reads its settings as a
frame on stdin, forks the process that confines itself and becomes the candidate, and — for a
verdict — then reads the test as a second frame and judges (see sandbox_verdict). Standard
library only, no import of cfpo_jax.

The test reaches this process only after the fork, and the child execs at once, so the test is
never in the candidate's memory, files, argv or environment; the child keeps no descriptor of
this process but its own pipes (the verdict's requests and answers).

Modes (the settings' "mode"):

* "bwrap" (root, bubblewrap installed; see cfpo_jax.sandbox): the child joins the run's cgroups
  (memory and pids, limits set by the caller), takes a private mount namespace with one tmpfs
  (size- and inode-limited) that holds everything the run can write (/work, /tmp, /dev/shm) and
  the read-only /sandbox (the script, or the server, the wire module and the solution), sets its
  rlimits, drops to the run's uid with no groups and no-new-privileges, and execs bubblewrap as
  that uid, which builds the minimal root and the namespaces and loads the seccomp filter. When
  the last process of the run ends, the mount namespace and its tmpfs go with it: nothing of
  the run is ever on disk.
* "plain" (anything else): the child sets its rlimits and runs the code under an audit hook that
  refuses sockets, process creation, signals and ctypes, in a directory the caller made — not a
  security boundary.

The outcome goes to the status descriptor as one line: "exit N cpu S" (a script; S: CPU seconds
of the child and what it reaped — under bwrap, bwrap's own), "verdict pass", "verdict fail WHY",
or "error MESSAGE" (the setup failed).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sandbox_wire as wire  # noqa: E402

CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_RDONLY, MS_REMOUNT = 2, 4, 1, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
REQUESTS_FD, ANSWERS_FD, SECCOMP_FD, ERROR_FD = 3, 4, 5, 9
_SETTINGS_CAP = _SPEC_CAP = 256 << 20

# Runs the script in "plain" mode. Audit hooks can be bypassed from Python (e.g. by code that
# corrupts the interpreter), so this only stops code that opens a socket or a process the usual way.
_PLAIN_RUNNER = """
import sys
def _refuse(event, args):
    if event.startswith(("socket.", "subprocess.", "os.fork", "os.exec", "os.posix_spawn",
                         "os.spawn", "os.system", "os.kill", "os.killpg", "signal.pthread_kill",
                         "ctypes.")):
        raise PermissionError(f"{event} is disabled in the sandbox")
path = sys.argv[1]
sys.argv = sys.argv[1:]
with open(path, encoding="utf-8") as f:
    code = compile(f.read(), path, "exec")
sys.addaudithook(_refuse)
exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
"""

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source, target, fstype, flags, data=None):
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")


def _write(path: str, data: str | bytes, mode: int = 0o444):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data if isinstance(data, bytes) else data.encode("utf-8"))
    finally:
        os.close(fd)


def _report(fd: int, line: str):
    os.write(fd, line.replace("\n", " ").encode(errors="replace") + b"\n")


def _stage_bwrap(cfg: dict) -> list[str]:
    """In the child, as root: cgroups, the private mount namespace and its tmpfs; the argv of
    bubblewrap."""
    for procs in cfg["cgroup_procs"]:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    _check(_libc.unshare(CLONE_NEWNS), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # opened before the stage may hide it; bound later through /proc/self/fd
    prefix = cfg["python_bind"] and os.open(cfg["python_bind"], os.O_PATH | os.O_DIRECTORY)
    stage, uid = cfg["stage"], cfg["uid"]
    _mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={cfg['disk_bytes']},nr_inodes={cfg['inodes']},mode=755")
    for name, mode in (("work", 0o700), ("tmp", 0o1777), ("shm", 0o1777)):
        os.mkdir(os.path.join(stage, name))
        os.chown(os.path.join(stage, name), uid, uid)
        os.chmod(os.path.join(stage, name), mode)
    box = os.path.join(stage, "sandbox")
    os.mkdir(box, 0o755)
    for name, text in cfg["files"].items():
        _write(os.path.join(box, name), text)
    _write(os.path.join(stage, "stdin"), cfg["stdin"], 0o400)
    os.chdir("/")
    argv = list(cfg["bwrap"])
    if cfg["python_bind"]:  # the interpreter's prefix, where the run's uid may not reach it
        python = os.path.join(stage, "python")
        os.mkdir(python, 0o755)
        _mount(f"/proc/self/fd/{prefix}", python, None, MS_BIND | MS_REC)
        os.close(prefix)
        _mount(None, python, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        argv[argv.index("@python@")] = python
    return [a.replace("@stage@", stage) for a in argv]


def _stage_plain(cfg: dict) -> list[str]:
    """In the child: the files in the caller's directory; the argv of the audit-hook runner."""
    stage = cfg["stage"]
    os.mkdir(os.path.join(stage, "work"), 0o700)
    os.mkdir(os.path.join(stage, "sandbox"), 0o755)
    for name, text in cfg["files"].items():
        _write(os.path.join(stage, "sandbox", name), text)
    _write(os.path.join(stage, "stdin"), cfg["stdin"], 0o400)
    os.chdir(os.path.join(stage, "work"))
    return [cfg["python"], "-I", "-S", "-c", _PLAIN_RUNNER,
            os.path.join(stage, "sandbox", cfg["entry"])]


def _set_limits(cfg: dict):
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), tuple(value))


def _place_fds(inherited: dict[int, int], error_fd: int) -> int:
    """dup2 each source onto its target number (3, 4, 5) and the error pipe onto 9 (closed on
    exec); every other descriptor above 2 closed. Returns 9."""
    moved = {target: os.dup(source) for target, source in inherited.items()}
    error = os.dup(error_fd)
    for target, source in moved.items():
        os.dup2(source, target, inheritable=True)
    os.dup2(error, ERROR_FD, inheritable=False)
    for fd in range(3, ERROR_FD):
        if fd not in inherited:
            try:
                os.close(fd)
            except OSError:
                pass
    os.closerange(ERROR_FD + 1, 1 << 16)
    return ERROR_FD


def _child(cfg: dict, inherited: dict[int, int], error_fd: int):
    """Becomes the candidate: confinement, identity, exec. Never returns."""
    try:
        if cfg["mode"] == "bwrap":
            argv = _stage_bwrap(cfg)
            if cfg["seccomp"]:
                seccomp_r, seccomp_w = os.pipe()
                os.write(seccomp_w, bytes.fromhex(cfg["seccomp"]))  # a few hundred bytes: fits
                os.close(seccomp_w)
                inherited = {**inherited, SECCOMP_FD: seccomp_r}
        else:
            argv = _stage_plain(cfg)
        os.dup2(os.open(os.path.join(cfg["stage"], "stdin"), os.O_RDONLY), 0)
        if cfg["quiet"]:  # a verdict: the candidate's output goes nowhere
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
        error_fd = _place_fds(inherited, error_fd)
        _set_limits(cfg)
        if cfg["mode"] == "bwrap":
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
            os.setgroups([])
            os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        # after the uid change, which clears it: the launcher's death kills this process
        _check(_libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl(PDEATHSIG)")
        os.execve(argv[0], argv, cfg["env"])
    except BaseException as e:  # noqa: BLE001  (reported, then this process ends)
        try:
            os.write(error_fd, f"{type(e).__name__}: {e}".encode(errors="replace"))
        finally:
            os._exit(127)


def main(status_fd: int):
    os.umask(0o022)
    cfg = json.loads(wire.read_frame(0, cap=_SETTINGS_CAP))
    verdict = cfg["quiet"]
    inherited = {}
    if verdict:
        requests_r, requests_w = os.pipe()
        answers_r, answers_w = os.pipe()
        inherited = {REQUESTS_FD: requests_r, ANSWERS_FD: answers_w}
    error_r, error_w = os.pipe2(os.O_CLOEXEC)
    started = time.monotonic()
    child = os.fork()
    if child == 0:
        os.close(status_fd)
        os.close(error_r)
        _child(cfg, inherited, error_w)
    os.close(error_w)
    for fd in inherited.values():
        os.close(fd)
    with os.fdopen(error_r, "rb") as f:
        error = f.read(4096)  # empty once the exec succeeded
    if error:
        _report(status_fd, "error " + error.decode(errors="replace"))
        return
    if not verdict:
        _, status, rusage = os.wait4(child, 0)
        cpu = rusage.ru_utime + rusage.ru_stime
        _report(status_fd, f"exit {os.waitstatus_to_exitcode(status)} cpu {cpu:.3f}")
        return
    # Only now, with the child exec'd into the sandbox, does the test come in.
    import sandbox_verdict
    try:
        spec = json.loads(wire.read_frame(0, cap=_SPEC_CAP))
        resource.setrlimit(resource.RLIMIT_AS, (cfg["verdict_memory"],) * 2)
        passed, why = sandbox_verdict.judge(spec, requests_w, answers_r,
                                            started + cfg["wall_s"])
    except BaseException as e:  # noqa: BLE001  (the candidate's answers cannot get here)
        passed, why = False, f"the verdict failed: {type(e).__name__}: {e}"
    _report(status_fd, "verdict pass" if passed else f"verdict fail {why}")


def _launch(fds: list[int]):
    """In a child of the fork server: becomes the launcher of one run (its stdin, stdout, stderr
    and status descriptor are `fds`). Never returns."""
    status_fd = 7
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in zip((0, 1, 2, status_fd), fds):
            os.dup2(fd, target)
        os.closerange(status_fd + 1, 1 << 16)
        main(status_fd)
    except BaseException as e:  # noqa: BLE001
        _report(status_fd, f"error {type(e).__name__}: {e}")
        os._exit(1)
    os._exit(0)


def serve(sock_fd: int):
    """The fork server: one per caller process, started once; forks a launcher per request, so
    that a run costs a fork rather than an interpreter's start. A request is a byte with four
    descriptors (the launcher's stdin, stdout, stderr, status); the answer a byte with a pidfd
    of the launcher (the caller kills it through that, never by a pid that may be reused).
    Exits when the caller closes its end or dies."""
    import socket
    # (No PR_SET_PDEATHSIG: it fires when the caller's *thread* that started it ends, e.g. a
    # thread pool's; the socket's end when the caller's process goes is what ends it.)
    # Orphans of the launchers (a verdict's launcher does not wait for its sandbox) come here
    # rather than to a pid 1 that may never reap them, and the kernel reaps them and the
    # launchers at once.
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(CHILD_SUBREAPER)")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    sock = socket.socket(fileno=sock_fd)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1, 4)
        except OSError:
            return
        if not message or len(fds) != 4:
            return
        pid = os.fork()
        if pid == 0:
            sock.close()
            _launch(fds)
        pidfd = os.pidfd_open(pid)
        for fd in fds:
            os.close(fd)
        socket.send_fds(sock, [b"1"], [pidfd])
        os.close(pidfd)


if __name__ == "__main__":
    import sandbox_verdict  # noqa: F401  (loaded once here, not in every launcher)
    serve(int(sys.argv[1]))
