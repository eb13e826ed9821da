"""cfpo_jax.sandbox: ordinary runs, limits, and hostile code.

Every hostile run must end as a failure within its wall limit + 1 s while this (the "trainer")
process stays unharmed. Tests that would be unsafe without the namespace isolation (a fork bomb
or `kill(-1)` as root in "plain" mode hits the whole shared box) are skipped there, saying why.
"""

import concurrent.futures
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from cfpo_jax import sandbox
from cfpo_jax.sandbox import Limits, run_python

SLACK_S = 1.0
needs_namespaces = pytest.mark.skipif(
    sandbox.isolation() != "namespaces",
    reason="needs the namespace isolation (root and unshare allowed): without it the code runs "
           "as the caller, who can write its files, read its /proc and whose fork bomb or "
           "kill(-1) would hit the whole machine")


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


def test_fresh_empty_work_dir_removed_afterwards(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = run_python("import os\nprint(os.listdir('.'))\nopen('mine.txt', 'w').write('x')\n"
                        "print(os.listdir('.'))")
    assert result.ok and result.stdout == "[]\n['mine.txt']\n", result
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("cfpo-sandbox-")] == []


@pytest.mark.parametrize("field, value", [("wall_s", 0), ("cpu_s", float("nan")),
                                          ("memory_mb", 10), ("processes", 0),
                                          ("output_bytes", 1.5), ("file_mb", True)])
def test_limits_reject_bad_values_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        Limits(**{field: value})


def test_bad_arguments():
    with pytest.raises(TypeError, match="code"):
        run_python(b"print(1)")
    with pytest.raises(TypeError, match="limits"):
        run_python("print(1)", limits={"wall_s": 1})


def test_concurrent_calls_keep_their_own_output_and_uid():
    codes = [f"import os\nprint({i}, os.getuid())" for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(run_python, codes))
    assert all(r.ok for r in results), results
    assert [int(r.stdout.split()[0]) for r in results] == list(range(12))
    if sandbox.isolation() == "namespaces":
        uids = [int(r.stdout.split()[1]) for r in results]
        assert all(uid in sandbox.UID_RANGE for uid in uids)
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
    assert ignored.killed_by == "cpu" and ignored.exit_code == -signal.SIGKILL, ignored


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


def test_trainer_environment_is_not_visible(monkeypatch):
    """Its own environment is built from scratch in both modes; the trainer's /proc/<pid>/environ
    is out of reach only with the namespaces (another uid, another PID namespace)."""
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("CFPO_TEST_SECRET", secret)
    pids = f"({os.getpid()}, os.getppid(), 1, 'self')" if sandbox.isolation() == "namespaces" \
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


@needs_namespaces
def test_writing_outside_its_directory_leaves_nothing(tmp_path):
    name = f"cfpo-escape-{uuid.uuid4().hex}"
    targets = [tmp_path / name, os.path.join(tempfile.gettempdir(), name),
               f"/var/tmp/{name}", f"/dev/shm/{name}", os.path.expanduser(f"~/{name}"),
               os.path.join(os.getcwd(), name)]
    code = ("import os\n"
            f"for path in {[str(t) for t in targets]!r} + ['../{name}']:\n"
            "    try:\n"
            "        with open(path, 'w') as f:\n"
            "            f.write('escaped')\n"
            "        print('wrote', path)\n"
            "    except OSError as e:\n"
            "        print('refused', path, type(e).__name__)\n")
    result = run_python(code, limits=Limits(wall_s=4.0))
    assert result.exit_code == 0, result
    for target in targets:
        assert not os.path.exists(target), (target, result.stdout)


def test_file_size_limit():
    result = run_python("open('big', 'wb').write(b'x' * 3 * 2**20)", limits=Limits(file_mb=1))
    assert not result.ok and "File too large" in result.stderr, result


@needs_namespaces
def test_fork_bomb_is_contained_and_cleaned_up():
    code = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
            "        pass")
    result = _hostile(code, Limits(wall_s=2.0, processes=8))
    assert result.timed_out
    time.sleep(0.2)
    assert _sandbox_processes() == []


@needs_namespaces
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
        result = _hostile(code, Limits(wall_s=4.0))
        assert "still here" not in result.stdout or result.exit_code != 0, result
        assert sentinel.poll() is None  # a process of the trainer's user, untouched
    finally:
        sentinel.kill()
        sentinel.wait()


def test_plain_mode_limits_and_audit_hook(monkeypatch):
    """The fallback where namespaces are unavailable: limits hold; the audit hook (not a security
    boundary) refuses ordinary sockets, process creation and signals."""
    monkeypatch.setattr(sandbox, "_isolation", "plain")
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
