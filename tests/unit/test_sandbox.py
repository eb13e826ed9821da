"""cfpo_jax.sandbox: ordinary runs, limits, and hostile code — each hostile case checked from
outside the sandbox (this process is the "trainer": its listeners, its view of /dev/pts, the
keyring, the disk, the cgroups, the processes left).

Every hostile run must end as a failure (or a refusal it reports) within its wall limit + slack
while this process stays unharmed. Tests that would be unsafe or meaningless without the bwrap
isolation (a fork bomb or `kill(-1)` as root in "plain" mode hits the whole shared box) are
skipped there, saying why.
"""

import ast
import concurrent.futures
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from tests.fixtures.leftovers import tagged_leftovers
from cfpo_jax import sandbox
from cfpo_jax.sandbox import Limits, run_python

SLACK_S = 1.5
needs_bwrap = pytest.mark.skipif(
    not sandbox.isolation().full,
    reason="needs the full bwrap isolation (root, bubblewrap, libseccomp's binding, writable "
           f"cgroups): {sandbox.isolation()}")


def _sandbox_processes() -> list[int]:
    """Processes of any sandbox user id still alive (zombies included)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid in sandbox.UID_RANGE:
                    pids.append(int(name))
            except FileNotFoundError:
                pass
    return pids


def _run_cgroups() -> list[str]:
    """Cgroups of runs still present under this process's sandbox cgroup roots."""
    left = []
    for root in sandbox.isolation().cgroup_roots:
        if os.path.isdir(root):
            left += [os.path.join(root, d) for d in os.listdir(root) if d.startswith("run-")]
    return left


def _hostile(code: str, limits: Limits, **kwargs):
    started = time.monotonic()
    result = run_python(code, limits=limits, **kwargs)
    elapsed = time.monotonic() - started
    assert not result.ok, result
    assert elapsed <= limits.wall_s + SLACK_S, (elapsed, result)
    return result


def test_ordinary_run_stdout_stderr_exit_code_and_stdin():
    result = run_python("import sys\nprint(6 * 7)\nprint('warn', file=sys.stderr)\n")
    assert (result.ok, result.stdout, result.stderr, result.exit_code) == \
        (True, "42\n", "warn\n", 0)
    assert not result.timed_out and result.killed_by is None and result.seconds > 0
    echoed = run_python("print(input()[::-1])", stdin_text="abc\n")
    assert echoed.ok and echoed.stdout == "cba\n"
    failed = run_python("raise SystemExit(3)")
    assert (failed.ok, failed.exit_code, failed.killed_by) == (False, 3, None)


def test_stdin_is_empty_by_default():
    result = run_python("import sys; print(repr(sys.stdin.read()))", limits=Limits(wall_s=3))
    assert result.ok and result.stdout == "''\n"


def test_fresh_empty_work_dir_and_nothing_left_on_disk():
    tag = f"mine-{uuid.uuid4().hex[:12]}"
    result = run_python(f"import os\nprint(os.listdir('.'))\nopen('{tag}', 'w').write('x')\n"
                        "print(os.listdir('.'))")
    assert result.ok and result.stdout == f"[]\n['{tag}']\n", result
    assert tagged_leftovers(tag) == []
    assert _run_cgroups() == []


@pytest.mark.parametrize("field, value", [("wall_s", 0), ("cpu_s", float("nan")),
                                          ("memory_mb", 10), ("processes", 0),
                                          ("output_bytes", 1.5), ("file_mb", True),
                                          ("disk_mb", 0), ("files", 10)])
def test_limits_reject_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        Limits(**{field: value})


def test_bad_arguments():
    with pytest.raises(TypeError, match="code"):
        run_python(b"print(1)")
    with pytest.raises(TypeError, match="limits"):
        run_python("print(1)", limits={"wall_s": 1})
    with pytest.raises(ValueError, match="entry_point"):
        sandbox.run_verdict("x = 1", {"test": "def check(c): pass"})
    with pytest.raises(ValueError, match="tests"):
        sandbox.run_verdict("x = 1", {})


def test_concurrent_calls_keep_their_own_output_and_uid():
    codes = [f"import os\nprint({i}, os.getuid())" for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(run_python, codes))
    assert all(r.ok for r in results), results
    assert [int(r.stdout.split()[0]) for r in results] == list(range(12))
    if sandbox.isolation().full:
        uids = [int(r.stdout.split()[1]) for r in results]
        assert all(uid in sandbox.UID_RANGE for uid in uids) and len(set(uids)) == 12
    assert _sandbox_processes() == []


def test_infinite_loop_is_killed_at_the_wall_clock():
    result = _hostile("while True:\n    pass", Limits(wall_s=2.0, cpu_s=30))
    assert result.timed_out and result.killed_by == "wall" and result.exit_code is None


def test_cpu_limit():
    # wall_s well above cpu_s: on a loaded box 1 CPU second can take several wall seconds
    result = _hostile("while True:\n    pass", Limits(wall_s=10.0, cpu_s=1))
    assert result.killed_by == "cpu" and not result.timed_out, result
    # SIGXCPU ignored: SIGKILL at the hard limit, a second later
    code = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass"
    ignored = _hostile(code, Limits(wall_s=10.0, cpu_s=1))
    assert ignored.killed_by == "cpu", ignored


def test_50gb_allocation_fails_fast():
    result = _hostile("x = bytearray(50 * 2**30)\nprint('allocated')", Limits(wall_s=3.0))
    assert result.killed_by == "memory" and "allocated" not in result.stdout, result


def test_1gb_of_output_is_cut_and_never_read_into_memory():
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    code = "import sys\nchunk = 'x' * 2**20\nfor _ in range(1024):\n    sys.stdout.write(chunk)"
    limits = Limits(wall_s=5.0, output_bytes=10_000)
    result = _hostile(code, limits)
    assert result.killed_by == "output" and not result.timed_out
    assert result.stdout.startswith("x" * 10_000)
    assert result.stdout.endswith("truncated at 10000 bytes]")
    assert len(result.stdout) < 10_100
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert growth_mb < 50, growth_mb
    stderr = _hostile("import sys\nwhile True:\n    sys.stderr.write('e' * 4096)", limits)
    assert stderr.killed_by == "output" and len(stderr.stderr) < 10_100


def test_no_socket_reaches_a_listener_of_the_trainer():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "s.sendall(b'escaped')\nprint('connected')")
    try:
        result = _hostile(code, Limits(wall_s=4.0))
        assert "connected" not in result.stdout, result
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


_UNIX_CLIENT = """
import socket
for address in {addresses!r}:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1)
        s.connect(address)
        s.sendall(b'escaped')
        print('connected', address)
    except OSError as e:
        print('refused', repr(address), type(e).__name__)
"""


@needs_bwrap
def test_no_path_or_abstract_unix_socket_of_the_host_is_reachable():
    """Listeners the trainer opens under /run and /tmp, and one in the abstract namespace: the
    sandbox's connects fail and none of them ever accepts a connection."""
    name = f"cfpo-test-{uuid.uuid4().hex[:12]}"
    paths = [f"/run/{name}.sock", os.path.join(tempfile.gettempdir(), f"{name}.sock")]
    abstract = f"\0{name}"
    listeners = []
    try:
        for address in paths + [abstract]:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(address)
            if not address.startswith("\0"):
                os.chmod(address, 0o777)  # nothing but the mount namespace keeps it out
            listener.listen()
            listener.settimeout(0.2)
            listeners.append(listener)
        result = run_python(_UNIX_CLIENT.format(addresses=paths + [abstract]),
                            limits=Limits(wall_s=5.0))
        assert result.ok and "connected" not in result.stdout, result
        assert result.stdout.count("refused") == 3
        for listener in listeners:
            with pytest.raises(socket.timeout):
                listener.accept()
    finally:
        for listener in listeners:
            listener.close()
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)


def test_trainer_environment_is_not_visible(monkeypatch):
    """Its own environment is built from scratch in both modes; the trainer's /proc/<pid>/environ
    is out of reach only with the namespaces (another uid, another PID namespace)."""
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("CFPO_TEST_SECRET", secret)
    pids = f"({os.getpid()}, os.getppid(), 1, 'self')" if sandbox.isolation().full \
        else "('self',)"
    code = (
        "import os\n"
        "print(dict(os.environ))\n"
        f"for pid in {pids}:\n"
        "    try:\n"
        "        print(pid, open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n"
        "        print(pid, 'refused', e)\n")
    result = run_python(code, limits=Limits(wall_s=4.0))
    assert result.ok, result
    assert secret not in result.stdout + result.stderr
    assert "CFPO_TEST_SECRET" not in result.stdout + result.stderr


@needs_bwrap
def test_writing_outside_its_directory_leaves_nothing(tmp_path):
    name = f"cfpo-escape-{uuid.uuid4().hex}"
    targets = [tmp_path / name, os.path.join(tempfile.gettempdir(), name),
               f"/var/tmp/{name}", f"/dev/shm/{name}", os.path.expanduser(f"~/{name}"),
               os.path.join(os.getcwd(), name), f"/run/{name}"]
    code = ("import os\n"
            f"for path in {[str(t) for t in targets]!r} + ['../{name}', '/{name}']:\n"
            "    try:\n"
            "        os.makedirs(os.path.dirname(path), exist_ok=True)\n"
            "        with open(path, 'w') as f:\n"
            "            f.write('escaped')\n"
            "        print('wrote', path)\n"
            "    except OSError as e:\n"
            "        print('refused', path, type(e).__name__)\n")
    result = run_python(code, limits=Limits(wall_s=4.0))
    assert result.exit_code == 0, result
    for target in targets + [f"/{name}"]:
        assert not os.path.exists(target), (target, result.stdout)


@needs_bwrap
def test_minimal_root_holds_no_host_paths():
    code = ("import os\nprint(sorted(os.listdir('/')))\n"
            "for p in ('/home', '/run', '/var', '/work/..', '/etc/passwd', '/root/.ssh'):\n"
            "    print(p, os.path.exists(p))\n")
    result = run_python(code, limits=Limits(wall_s=4.0))
    assert result.ok, result
    tops = set(ast.literal_eval(result.stdout.splitlines()[0]))
    assert tops <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "root",
                    "sandbox", "sbin", "tmp", "usr", "work"}, tops
    assert "/home False" in result.stdout and "/run False" in result.stdout
    assert "/etc/passwd False" in result.stdout and "/root/.ssh False" in result.stdout


def test_file_size_limit():
    result = run_python("open('big', 'wb').write(b'x' * 3 * 2**20)", limits=Limits(file_mb=1))
    assert not result.ok and "File too large" in result.stderr, result


@needs_bwrap
def test_fork_bomb_is_contained_and_cleaned_up():
    code = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
            "        pass")
    result = _hostile(code, Limits(wall_s=2.0, processes=16))
    assert result.timed_out
    assert _sandbox_processes() == [] and _run_cgroups() == []


@needs_bwrap
@pytest.mark.parametrize("attack", [
    "os.kill(os.getppid(), signal.SIGKILL)",
    "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
    "os.killpg(os.getpgid(0), signal.SIGKILL)",
    "os.kill(-1, signal.SIGKILL)",
    "os.kill(TRAINER, signal.SIGKILL)",
    "os.kill(SENTINEL, signal.SIGKILL)",
])
def test_killing_its_parent_or_the_trainer(attack):
    sentinel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        code = (f"import os, signal\nTRAINER, SENTINEL = {os.getpid()}, {sentinel.pid}\n"
                f"{attack}\nimport time; time.sleep(1)\nprint('still here')")
        started = time.monotonic()
        result = run_python(code, limits=Limits(wall_s=4.0))
        assert time.monotonic() - started <= 4.0 + SLACK_S, result
        # Its parent is the PID namespace's init, which ignores signals from inside: the run
        # may go on ("still here") or end, but nothing outside it is touched.
        assert sentinel.poll() is None  # a process of the trainer's user, untouched
        assert run_python("print(1)").stdout == "1\n"  # the fork server too
    finally:
        sentinel.kill()
        sentinel.wait()


# --- Limits for the run as a whole (issue 31, point 3) ------------------------------------------

@needs_bwrap
@pytest.mark.parametrize("where", ["memfd", "/dev/shm"])
def test_memfd_and_shared_memory_count_against_memory_mb(where):
    """640 MiB into a memfd (or a /dev/shm file) at memory_mb=256: the cgroup ends it before
    256 MiB (it reports each 10 MiB written; RLIMIT_AS never saw that memory)."""
    opener = ("os.memfd_create('x')" if where == "memfd"
              else "os.open('/dev/shm/x', os.O_CREAT | os.O_RDWR)")
    code = (f"import os\nfd = {opener}\nfor i in range(64):\n"
            "    os.write(fd, b'x' * (10 << 20))\n    print((i + 1) * 10, flush=True)\n")
    result = _hostile(code, Limits(memory_mb=256, disk_mb=4096, file_mb=4096, wall_s=10.0))
    written = int(result.stdout.split()[-1]) if result.stdout.split() else 0
    assert result.killed_by == "memory" and written < 256, result
    assert result.memory_peak_mb <= 256  # the kernel's count, read from outside


@needs_bwrap
def test_four_processes_share_one_memory_limit():
    """4 processes × 200 MiB touched at memory_mb=512: not all four keep theirs to the end.
    (All four may print 'holding': the OOM killer picks the largest process, often one that
    already holds its 200 MiB, and the allocating one then goes on.)"""
    code = ("import os, time\nfor k in range(4):\n    if os.fork() == 0:\n"
            "        b = bytearray(200 << 20)\n        b[::4096] = b'x' * len(b[::4096])\n"
            "        print('holding', k, flush=True)\n        time.sleep(3)\n"
            "        print('released', k, flush=True)\n        os._exit(0)\n"
            "for k in range(4):\n    os.wait()\n")
    result = run_python(code, limits=Limits(memory_mb=512, wall_s=15.0))  # a loaded box
    assert result.killed_by == "memory", result
    assert result.stdout.count("released") < 4, result
    assert 200 < result.memory_peak_mb <= 512, result


@needs_bwrap
def test_disk_quota_covers_everything_it_can_write():
    """Writing 2 GiB across /work, /tmp and /dev/shm at disk_mb=32: ENOSPC at 32 MiB in all,
    and the host's disk is untouched (its free space does not fall by the 2 GiB)."""
    free_before = shutil.disk_usage("/").free
    code = ("n = 0\nfor d in ('/work', '/tmp', '/dev/shm'):\n    try:\n"
            "        with open(f'{d}/big', 'wb') as f:\n            for _ in range(700):\n"
            "                f.write(b'x' * (1 << 20))\n                f.flush()\n"
            "                n += 1\n    except OSError as e:\n        print(d, e.errno)\n"
            "print('total', n)\n")
    result = run_python(code, limits=Limits(disk_mb=32, file_mb=4096, wall_s=10.0))
    assert result.ok, result
    total = int(result.stdout.split()[-1])
    assert total <= 32 and result.stdout.count(" 28\n") == 3, result  # ENOSPC everywhere
    assert free_before - shutil.disk_usage("/").free < 1 << 30


@needs_bwrap
def test_millions_of_files_stop_at_the_inode_limit_and_leave_nothing():
    code = ("import os\nn = 0\ntry:\n    while n < 2_000_000:\n"
            "        open(f'/work/f{n}', 'w').close()\n        n += 1\nexcept OSError as e:\n"
            "    print(n, e.errno)\n")
    result = run_python(code, limits=Limits(files=4096, wall_s=10.0))
    assert result.ok, result
    count, errno_ = map(int, result.stdout.split())
    assert count < 4096 and errno_ == 28, result
    assert _run_cgroups() == []


@needs_bwrap
def test_deep_trees_and_unreadable_modes_leave_nothing_and_do_not_raise():
    """5,000 nested directories (shutil.rmtree's recursion limit is ~1,000), the deepest ones
    mode 000: the run ends normally and nothing is left anywhere."""
    tag = f"d-{uuid.uuid4().hex[:12]}"
    code = (f"import os\nos.mkdir('{tag}')\nos.chdir('{tag}')\nfor i in range(5000):\n"
            "    os.mkdir('d')\n    os.chdir('d')\n"
            "os.mkdir('locked')\nopen('locked/f', 'w').close()\nos.chmod('locked', 0)\n"
            "print('deep')\n")
    failures = sandbox.cleanup_failures()
    result = run_python(code, limits=Limits(wall_s=10.0))
    assert result.ok and result.stdout == "deep\n", result
    assert tagged_leftovers(tag) == []
    assert sandbox.cleanup_failures() == failures and _run_cgroups() == []


@needs_bwrap
def test_no_host_pty():
    """It gets ptys from a devpts of its own: the host's /dev/pts does not change while it holds
    three of them."""
    host_before = set(os.listdir("/dev/pts"))
    seen = []

    def watch():
        time.sleep(1.0)
        seen.append(set(os.listdir("/dev/pts")))

    watcher = threading.Thread(target=watch)
    watcher.start()
    code = ("import os, time\nprint(os.listdir('/dev/pts'))\n"
            "ptys = [os.openpty() for _ in range(3)]\n"
            "print([os.ttyname(s) for _, s in ptys], flush=True)\ntime.sleep(2)\n")
    result = run_python(code, limits=Limits(wall_s=6.0))
    watcher.join()
    assert result.ok, result
    assert result.stdout.splitlines()[0] == "['ptmx']"  # none of the host's
    # three ptys of the host's devpts would be three new entries (others' ptys: rarely one)
    assert len(seen[0] - host_before) < 3, (seen, host_before)


# --- No channel out, no trace left (point 4) ---------------------------------------------------

_SYSCALLS = """
import ctypes, os, socket
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    r = libc.syscall(*args)
    print(name, r, os.strerror(ctypes.get_errno()) if r < 0 else 'ok')
call('add_key', 248, b'user', b'cfpo-{tag}', b'leftover', 8, ctypes.c_int(-4))  # @u keyring
call('keyctl_join', 250, 1, b'cfpo-{tag}')  # KEYCTL_JOIN_SESSION_KEYRING
call('unshare_newuser', 272, 0x10000000)
call('clone_newuser', 56, 0x10000000 | 17, 0, 0, 0, 0)
call('io_uring_setup', 425, 8, ctypes.create_string_buffer(120))
for family in (socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK, socket.AF_PACKET):
    try:
        socket.socket(family, socket.SOCK_DGRAM if family != socket.AF_PACKET else socket.SOCK_RAW)
        print('socket', int(family), 'ok')
    except OSError as e:
        print('socket', int(family), e.strerror)
"""


def _key_users() -> set[int]:
    with open("/proc/key-users") as f:
        return {int(line.split(":")[0]) for line in f}


@needs_bwrap
def test_seccomp_refuses_keyring_user_namespaces_io_uring_and_other_sockets():
    tag = uuid.uuid4().hex[:8]
    before = _key_users()
    result = run_python(_SYSCALLS.format(tag=tag), limits=Limits(wall_s=5.0))
    assert result.ok, result
    lines = result.stdout.splitlines()
    for name in ("add_key", "keyctl_join", "unshare_newuser", "clone_newuser",
                 "io_uring_setup"):
        line = next(line for line in lines if line.startswith(name + " "))
        assert line.split()[1] == "-1" and "not permitted" in line, line
    assert [line for line in lines if line.startswith("socket") and line.endswith("ok")] == []
    # From outside: no sandbox uid owns a key, and the keyring users are those of before.
    assert not {uid for uid in _key_users() - before if uid in sandbox.UID_RANGE}
    assert not [uid for uid in _key_users() if uid in sandbox.UID_RANGE]


_LEAVE = """
import os, socket, time
for d in ('/work', '/tmp', '/dev/shm'):
    open(f'{d}/left-{tag}', 'w').write('x')
listener = socket.socket(socket.AF_UNIX)
listener.bind('\\0left-{tag}')
listener.listen()
if os.fork() == 0:  # a daemon that would outlive the run
    os.setsid()
    if os.fork() == 0:
        listener.accept()
        time.sleep(60)
    os._exit(0)
print('left', flush=True)
"""
_LOOK = """
import os, socket
found = [f'{d}/left-{tag}' for d in ('/work', '/tmp', '/dev/shm')
         if os.path.exists(f'{d}/left-{tag}')]
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect('\\0left-{tag}')
    found.append('abstract socket')
except OSError:
    pass
others = [p for p in os.listdir('/proc') if p.isdigit() and int(p) not in (1, os.getpid())]
found += [open(f'/proc/{p}/cmdline').read() for p in others]
print('found', found)
"""


@needs_bwrap
def test_a_later_run_finds_nothing_an_earlier_one_left():
    tag = uuid.uuid4().hex[:8]
    left = run_python(_LEAVE.replace("{tag}", tag), limits=Limits(wall_s=5.0))
    assert left.ok and left.stdout == "left\n", left
    assert _sandbox_processes() == [] and _run_cgroups() == []  # the daemon died with the run
    look = run_python(_LOOK.replace("{tag}", tag), limits=Limits(wall_s=5.0))
    assert look.ok and look.stdout == "found []\n", look


# --- Correct code passes (point 5) -------------------------------------------------------------

@needs_bwrap
def test_multiprocessing_and_thread_pools_work():
    code = ("import multiprocessing as mp\n"
            "from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor\n"
            "def square(x):\n    return x * x\n"
            "if __name__ == '__main__':\n"
            "    lock = mp.Lock()\n    with lock:\n        pass\n"
            "    with mp.Pool(4) as pool:\n        print(pool.map(square, range(5)))\n"
            "    with ProcessPoolExecutor(4) as pool:\n        print(list(pool.map(square, [7])))\n"
            "    with ThreadPoolExecutor(32) as pool:\n"
            "        print(sum(pool.map(square, range(1000))))\n")
    result = run_python(code, limits=Limits(wall_s=10.0))
    assert result.ok, result
    assert result.stdout == "[0, 1, 4, 9, 16]\n[49]\n332833500\n"


# --- Say what holds (point 6) ------------------------------------------------------------------

@pytest.fixture
def reset_sandbox():
    yield
    sandbox.configure(strict=False, mode="auto")


def test_isolation_reports_what_holds_and_strict_refuses_without_the_full_set(reset_sandbox):
    iso = sandbox.isolation()
    assert iso.mode in ("bwrap", "plain") and set(iso.protections) <= set(sandbox.FULL)
    assert set(iso.protections) | set(iso.missing) == set(sandbox.FULL)
    assert str(iso).startswith(f"sandbox isolation {iso.mode}: ")
    if os.geteuid() == 0 and shutil.which("bwrap"):
        assert iso.full, iso  # the CI machine installs bubblewrap and libseccomp's binding
    sandbox.configure(strict=True)
    if iso.full:
        assert run_python("print(1)").ok  # strict with the full set: runs
    sandbox.configure(mode="plain")
    assert sandbox.isolation().missing == sandbox.FULL
    with pytest.raises(sandbox.SandboxRefused, match="separate_verdict"):
        run_python("print(1)")
    with pytest.raises(sandbox.SandboxRefused):
        sandbox.run_verdict("x = 1", {"tests": "assert x == 1"})
    with pytest.raises(TypeError, match="strict"):
        sandbox.configure(strict="yes")
    with pytest.raises(ValueError, match="mode"):
        sandbox.configure(mode="namespaces")


def test_from_config_sets_strict_and_probes_only_for_runs_that_run_code(reset_sandbox):
    from cfpo_jax.config import base_config
    config = base_config()
    assert sandbox.from_config(config) is None  # the math reward, no tools: nothing to do
    config.rewards.fns, config.rewards.weights = ("code",), (1.0,)
    config.rewards.code_strict = True
    sandbox.configure(mode="plain")
    with pytest.raises(sandbox.SandboxRefused):
        sandbox.from_config(config)
    sandbox.configure(strict=False, mode="auto")
    config.rewards.code_strict = False
    assert sandbox.from_config(config) == sandbox.isolation()


def test_plain_mode_limits_and_audit_hook(reset_sandbox):
    """The fallback where bwrap is unavailable: limits hold; the audit hook (not a security
    boundary) refuses ordinary sockets, process creation and signals; a verdict still works."""
    sandbox.configure(mode="plain")
    ok = run_python("print(sum(range(10)))")
    assert ok.ok and ok.stdout == "45\n", ok
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.3)
    try:
        port = listener.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}))"
        refused = _hostile(code, Limits(wall_s=3.0))
        assert "PermissionError" in refused.stderr
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    spawn = _hostile("import subprocess; subprocess.run(['true'])", Limits(wall_s=3.0))
    assert "PermissionError" in spawn.stderr
    kill = _hostile(f"import os\nprint(os.getppid() != {os.getpid()})\nos.kill(os.getppid(), 9)",
                    Limits(wall_s=3.0))
    assert kill.stdout == "True\n" and "PermissionError" in kill.stderr  # parent: the launcher
    assert _hostile("while True: pass", Limits(wall_s=1.0, cpu_s=10)).killed_by == "wall"
    assert _hostile("bytearray(50 * 2**30)", Limits(wall_s=3.0)).killed_by == "memory"
    spec = {"tests": "assert add(2, 3) == 5"}
    assert sandbox.run_verdict("def add(a, b):\n    return a + b\n", spec).passed
    assert not sandbox.run_verdict("def add(a, b):\n    return a - b\n", spec).passed
