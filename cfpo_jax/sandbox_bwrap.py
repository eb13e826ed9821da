"""What a bwrap run consists of (cfpo_jax.sandbox): bubblewrap's options — the namespaces and
the minimal root — and the seccomp filter, compiled once per process.

The root holds /usr read-only (with the host's /bin, /lib, ... links to it), ld.so.cache and the
interpreter's prefix (bound by the launcher where it lies outside /usr), a fresh /proc, a /dev
of its own with a private devpts, and from the run's tmpfs /work, /tmp, /dev/shm and the
read-only /sandbox; nothing else of the host. "@stage@" and "@python@" are filled in by the
launcher (sandbox_boot), which knows where the run's tmpfs and the prefix's bind are.
"""

from __future__ import annotations

import errno
import os

def seccomp_bpf() -> bytes:
    """The filter, compiled to BPF by libseccomp (Debian's python3-seccomp or pyseccomp)."""
    try:
        import seccomp
    except ImportError:
        import pyseccomp as seccomp
    refuse = seccomp.ERRNO(errno.EPERM)
    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in ("keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter",
                 "io_uring_register", "unshare", "setns", "mount", "umount2", "pivot_root",
                 "chroot", "fsopen", "fsmount", "fspick", "move_mount", "open_tree",
                 "mount_setattr", "bpf", "perf_event_open", "userfaultfd", "ptrace",
                 "process_vm_writev", "kexec_load", "kexec_file_load", "init_module",
                 "finit_module", "delete_module", "open_by_handle_at", "name_to_handle_at",
                 "acct", "swapon", "swapoff", "reboot", "syslog", "quotactl"):
        rules.add_rule(refuse, name)
    clone_newuser = 0x10000000
    rules.add_rule(refuse, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, clone_newuser,
                                                clone_newuser))
    # clone3's flags sit in memory the filter cannot read: "not implemented" makes glibc fall
    # back to clone (threads, fork), which the rule above checks.
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for name in ("socket", "socketpair"):
        rules.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), name,
                       seccomp.Arg(0, seccomp.NE, 1))  # AF_UNIX = 1
    fd = os.memfd_create("cfpo-seccomp")
    with os.fdopen(fd, "w+b") as f:
        rules.export_bpf(f)
        f.seek(0)
        return f.read()


# The run's environment, built from scratch: nothing of the caller's.
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/tmp",
       "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1"}


def argv(bwrap: str, prefix: str, *, seccomp: bool) -> tuple[list[str], bool]:
    """bubblewrap's options (uid and command added per run) and whether the prefix needs the
    launcher's bind (it lies outside /usr). seccomp: the launcher passes the filter on fd 5."""
    options = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
               "--new-session", "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            options += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            options += ["--ro-bind", top, top]
    options += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    outside_usr = not prefix.startswith("/usr/")
    if outside_usr:
        options += ["--ro-bind", "@python@", prefix]
    options += ["--proc", "/proc", "--dev", "/dev", "--bind", "@stage@/shm", "/dev/shm",
                "--bind", "@stage@/work", "/work", "--bind", "@stage@/tmp", "/tmp",
                "--ro-bind", "@stage@/sandbox", "/sandbox", "--chdir", "/work", "--clearenv"]
    for key, value in ENV.items():
        options += ["--setenv", key, value]
    if seccomp:
        options += ["--seccomp", "5"]  # sandbox_boot.SECCOMP_FD
    return options, outside_usr
