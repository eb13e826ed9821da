"""The cgroups of sandboxed runs (cfpo_jax.sandbox): where they may be made, and one run's.

A run's cgroups sit under this process's own cgroup of each controller, in a "cfpo-sandbox"
directory: memory (v1 memory.limit_in_bytes and memsw, or v2 memory.max and swap.max 0) bounds
all the run's processes together, shared memory and tmpfs files included; pids (pids.max) its
processes and threads together. The launcher's child writes its own pid into `procs` before it
starts anything, so every process of the run is counted from its first.
"""

from __future__ import annotations

import errno
import itertools
import os
import signal
import time


class CgroupError(RuntimeError):
    """A run's cgroups could not be emptied."""


def roots() -> dict[str, str]:
    """{"memory": dir, "pids": dir} under which this process may make the runs' cgroups: its own
    cgroup of each controller (v1) or of the unified hierarchy (v2)."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            fstype = fields[fields.index("-") + 1]
            if fstype == "cgroup":
                for option in fields[-1].split(","):
                    if option in ("memory", "pids"):
                        mounts[option] = (fields[4], fields[3])
            elif fstype == "cgroup2":
                mounts.setdefault("", (fields[4], fields[3]))
    roots = {}
    for controller in ("memory", "pids"):
        key = controller if controller in mounts else ""
        if key not in mounts or key not in own:
            continue
        mount_point, mount_root = mounts[key]
        relative = os.path.relpath(own[key], mount_root) if own[key].startswith(mount_root) \
            else None
        if relative is None:
            continue
        if key == "":
            with open(os.path.join(mount_point, "cgroup.controllers")) as f:
                if controller not in f.read().split():
                    continue
        roots[controller] = os.path.normpath(os.path.join(mount_point, relative,
                                                          "cfpo-sandbox"))
    return roots


_counter = itertools.count()


class RunCgroups:
    """One run's cgroups: memory.max/limit_in_bytes and pids.max set; `close` kills whatever is
    left in them and removes them (it never raises: it returns what went wrong)."""

    def __init__(self, roots: dict[str, str], memory_bytes: int, processes: int):
        self.dirs = []
        name = f"run-{os.getpid()}-{next(_counter)}"
        try:
            for controller, root in roots.items():
                os.makedirs(root, exist_ok=True)
                path = os.path.join(root, name)
                os.mkdir(path)
                self.dirs.append(path)
                v2 = os.path.exists(os.path.join(path, "cgroup.controllers"))
                if controller == "memory" and v2:
                    self._set(path, "memory.max", memory_bytes)
                    self._set(path, "memory.swap.max", 0, optional=True)
                elif controller == "memory":
                    self._set(path, "memory.limit_in_bytes", memory_bytes)
                    self._set(path, "memory.memsw.limit_in_bytes", memory_bytes,
                              optional=True)
                else:
                    self._set(path, "pids.max", processes)
        except BaseException:
            self.close()
            raise
        self.procs = [os.path.join(d, "cgroup.procs") for d in dict.fromkeys(self.dirs)]

    @staticmethod
    def _set(path: str, name: str, value: int, optional: bool = False):
        try:
            with open(os.path.join(path, name), "w") as f:
                f.write(str(value))
        except FileNotFoundError:
            if not optional:
                raise

    def memory_peak_mb(self) -> float | None:
        for path in self.dirs:
            for name in ("memory.max_usage_in_bytes", "memory.peak"):
                try:
                    with open(os.path.join(path, name)) as f:
                        return int(f.read()) / 2**20
                except FileNotFoundError:
                    continue
        return None

    def oom_kills(self) -> int:
        for path in self.dirs:
            for name in ("memory.oom_control", "memory.events"):
                try:
                    with open(os.path.join(path, name)) as f:
                        for line in f:
                            if line.startswith("oom_kill "):
                                return int(line.split()[1])
                except FileNotFoundError:
                    continue
        return 0

    def kill(self):
        """SIGKILL everything in the run's cgroups until they are empty (bounded by pids.max)."""
        deadline = time.monotonic() + 5.0
        while True:
            pids = set()
            for procs in getattr(self, "procs", []):
                try:
                    with open(procs) as f:
                        pids.update(int(p) for p in f.read().split())
                except FileNotFoundError:
                    pass
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise CgroupError(f"processes {sorted(pids)} of {self.dirs} survive SIGKILL")
            time.sleep(0.005)

    def close(self) -> str | None:
        """None when all went well, else what did not."""
        try:
            self.kill()
            for path in reversed(self.dirs):
                for attempt in range(200):  # a killed process leaves its cgroup a moment later
                    try:
                        os.rmdir(path)
                        break
                    except FileNotFoundError:
                        break
                    except OSError as e:
                        if e.errno != errno.EBUSY or attempt == 199:
                            raise
                        time.sleep(0.005)
        except Exception as e:  # noqa: BLE001  (cleanup never raises into a batch)
            return f"cgroups {self.dirs}: {e}"
        return None
