"""The launcher of one sandboxed run: started by `cfpo_jax.sandbox` as `python -I -S <this file>
<json>`, it confines itself and then starts the user's interpreter. Standard library only (it runs
without site-packages), no import of cfpo_jax.

Two modes (the JSON's "mode"):

* "namespaces" (run as root where the kernel allows it): the launcher unshares mount, network,
  PID, IPC and UTS namespaces; hides every directory in "hide" under an empty read-only tmpfs and
  binds back, read-only, the interpreter's prefix; mounts the work directory at its own path; then
  forks the namespace's init (pid 1, still root) which mounts a fresh /proc, forks the user's
  process and reaps every process of the namespace until the user's process ends. The user's
  process sets its rlimits, no-new-privileges, drops to "uid"/"gid" with no supplementary groups
  and execs the interpreter. When pid 1 exits or is killed, the kernel kills every process of the
  namespace, so nothing the code started can outlive the run.
* "plain" (anything else): the launcher forks the user's process (so its parent is the
  launcher, not the caller), which sets its rlimits and runs the code through `_PLAIN_RUNNER`,
  an audit hook that refuses sockets, process creation, signals and ctypes — not a security
  boundary.

The outcome goes to the status file descriptor "status_fd" as one line: "exit N cpu S",
"signal N cpu S" (S: the user process's CPU seconds) or "error MESSAGE" (the setup failed).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

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


def _set_limits(cfg: dict):
    for name, value in cfg["rlimits"].items():
        resource.setrlimit(getattr(resource, name), tuple(value))


def _report(fd: int, line: str):
    os.write(fd, line.encode() + b"\n")


def _status_line(status: int, rusage) -> str:
    cpu = rusage.ru_utime + rusage.ru_stime
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)} cpu {cpu:.3f}"
    return f"exit {os.waitstatus_to_exitcode(status)} cpu {cpu:.3f}"


def _confine_mounts(cfg: dict, source: str, script: str):
    """Private mounts; `hide` under empty tmpfs; the interpreter and the work dir bound back; the
    script written (root-owned, read-only to the user) beside the work dir."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Opened before anything is hidden: the binds' sources, reachable later through /proc/self/fd.
    keep = [(os.open(path, os.O_PATH | os.O_DIRECTORY), path, read_only)
            for path, read_only in ((cfg["python_prefix"], True), (cfg["work"], False))]
    hidden = []
    for directory in cfg["hide"]:
        if os.path.isdir(directory):  # (not when inside one hidden already)
            size_kb = 64 + 2 * len(source.encode("utf-8")) // 1024  # room for the script
            _mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_kb}k,mode=755")
            hidden.append(directory)
    for fd, path, read_only in keep:
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        if read_only:
            _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fd)
    fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, source.encode("utf-8"))
    os.close(fd)
    for directory in hidden:  # nothing more to write there, for anyone
        _mount(None, directory, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _exec_user(cfg: dict, script: str):
    """In the process that becomes the user's: limits, identity, then the interpreter."""
    _set_limits(cfg)
    if cfg["mode"] == "namespaces":
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        os.setgroups([])
        os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        argv = [cfg["python"], "-I", "-S", script]
    else:
        argv = [cfg["python"], "-I", "-S", "-c", _PLAIN_RUNNER, script]
    os.chdir(cfg["work"])
    os.execve(cfg["python"], argv, cfg["env"])


def _namespace_init(cfg: dict, status_fd: int, script: str) -> int:
    """pid 1 of the new PID namespace: /proc, the user's process, reaping; its status reported."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _run_user(cfg, status_fd, script)
    return 0


def _run_user(cfg: dict, status_fd: int, script: str):
    """Forks the user's process and reaps children (in a PID namespace: every orphan of it)
    until that one ends; reports its status."""
    user = os.fork()
    if user == 0:
        try:
            os.close(status_fd)
            _exec_user(cfg, script)
        except BaseException as e:  # noqa: BLE001  (reported, then this process ends)
            os.write(2, f"sandbox: cannot start the interpreter: {e}\n".encode())
        os._exit(127)
    while True:
        pid, status, rusage = os.wait4(-1, 0)
        if pid == user:
            _report(status_fd, _status_line(status, rusage))
            return


def main():
    cfg = json.loads(sys.argv[1])
    os.umask(0o022)
    status_fd = cfg["status_fd"]
    try:
        if cfg["mode"] == "namespaces":
            # The script moves into the (hidden, then rebuilt) parent of the work dir, root-owned.
            with open(cfg["script"], encoding="utf-8") as f:
                source = f.read()
            _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
                                 | CLONE_NEWUTS), "unshare")
            script = os.path.join(os.path.dirname(cfg["work"]), "main.py")
            _confine_mounts(cfg, source, script)
        else:
            script = cfg["script"]
    except BaseException as e:  # noqa: BLE001
        _report(status_fd, f"error {type(e).__name__}: {e}")
        os._exit(1)
    if cfg["mode"] != "namespaces":
        _run_user(cfg, status_fd, script)  # so that its parent is this launcher, not the caller
        os._exit(0)
    init = os.fork()  # the first child after unshare(CLONE_NEWPID) is the namespace's pid 1
    if init == 0:
        try:
            _check(_libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl(PDEATHSIG)")
            code = _namespace_init(cfg, status_fd, script)
        except BaseException as e:  # noqa: BLE001
            _report(status_fd, f"error {type(e).__name__}: {e}")
            code = 1
        os._exit(code)
    os.close(status_fd)
    _, status = os.waitpid(init, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__":
    main()
