"""Per-program cgroups (v2, or v1 ``memory`` + ``pids``): detection, creation with the memory and
process limits, joining, and removal."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from .runtime import Limits

# sh -c _JOIN sh <cgroup.procs files> -- <command>: join the cgroups, then become the command
_JOIN = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
_HELPERS = 4  # processes of the sandbox itself in its cgroup: bwrap or the launcher, the harness


class Cgroups:
    """Per-program cgroups (v2, or v1 ``memory`` + ``pids``) below the trainer's own cgroup."""

    def __init__(self, version: int, parents: dict[str, str]):
        self.version = version
        self.parents = parents  # controller ("" for v2) -> parent directory
        self._counter = 0
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"cgroup v{self.version} below {', '.join(sorted(set(self.parents.values())))}"

    @classmethod
    def detect(cls, root: str = "/sys/fs/cgroup") -> tuple["Cgroups | None", str]:
        """A usable cgroup setup, or None and the reason."""
        try:
            with open("/proc/self/cgroup") as f:
                lines = [line.rstrip("\n").split(":", 2) for line in f if line.count(":") >= 2]
        except OSError as exc:
            return None, f"cannot read /proc/self/cgroup: {exc}"
        own = {ctrl: path for _, ctrl, path in lines}
        reasons = []
        if os.path.exists(os.path.join(root, "cgroup.controllers")) and "" in own:
            base = os.path.join(root, own[""].lstrip("/"))
            for parent in (base, os.path.dirname(base)):
                if not parent.startswith(root):
                    continue
                try:
                    with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                        enabled = set(f.read().split())
                except OSError as exc:
                    reasons.append(f"{parent}: {exc.strerror}")
                    continue
                if not {"memory", "pids"} <= enabled:
                    reasons.append(f"{parent} does not delegate memory and pids to its children")
                    continue
                found = cls(2, {"": parent})
                problem = found._probe()
                if problem is None:
                    return found, ""
                reasons.append(problem)
        else:
            parents = {}
            for ctrl in ("memory", "pids"):
                key = next((k for k in own if ctrl in k.split(",")), None)
                mount = os.path.join(root, ctrl)
                if key is None or not os.path.isdir(mount):
                    reasons.append(f"no cgroup v1 {ctrl} hierarchy")
                    break
                parents[ctrl] = os.path.join(mount, own[key].lstrip("/"))
            else:
                found = cls(1, parents)
                problem = found._probe()
                if problem is None:
                    return found, ""
                reasons.append(problem)
        return None, "; ".join(reasons) or "no cgroup hierarchy"

    def _probe(self) -> str | None:
        try:
            group = self.create(Limits(memory_mb=64, disk_mb=1, max_processes=4))
        except OSError as exc:
            return f"cannot create a cgroup: {exc}"
        try:  # a process can join it
            joined = subprocess.run(["/bin/sh", "-c", _JOIN, "sh", *group.procs, "--", "/bin/sh", "-c", "exit 0"],
                                    stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
            if joined.returncode != 0:
                return f"cannot move a process into {group.dirs[0]}: {joined.stderr.decode(errors='replace').strip()}"
        except (OSError, subprocess.SubprocessError) as exc:
            return f"cannot move a process into a cgroup: {exc}"
        finally:
            group.remove()
        return None

    def create(self, limits: Limits) -> "_Cgroup":
        with self._lock:
            self._counter += 1
            name = f"rlctl-sandbox-{os.getpid()}-{self._counter}-{secrets.token_hex(3)}"
        memory = (limits.memory_mb + limits.disk_mb) << 20
        group = _Cgroup([])
        try:
            if self.version == 2:
                path = os.path.join(self.parents[""], name)
                os.mkdir(path)
                group.dirs.append(path)
                _write(path, "memory.max", str(memory))
                _write(path, "memory.swap.max", "0", optional=True)
                _write(path, "memory.oom.group", "1", optional=True)
                _write(path, "pids.max", str(limits.max_processes + _HELPERS))
            else:
                mem = os.path.join(self.parents["memory"], name)
                os.mkdir(mem)
                group.dirs.append(mem)
                _write(mem, "memory.limit_in_bytes", str(memory))
                _write(mem, "memory.memsw.limit_in_bytes", str(memory), optional=True)
                pids = os.path.join(self.parents["pids"], name)
                os.mkdir(pids)
                group.dirs.append(pids)
                _write(pids, "pids.max", str(limits.max_processes + _HELPERS))
        except OSError:
            group.remove()
            raise
        return group


def _write(directory: str, name: str, value: str, optional: bool = False) -> None:
    try:
        with open(os.path.join(directory, name), "w") as f:
            f.write(value)
    except OSError:
        if not optional:
            raise


@dataclass
class _Cgroup:
    dirs: list[str]

    @property
    def procs(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def remove(self) -> None:
        for d in self.dirs:
            for attempt in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    self._kill(d)
                    time.sleep(0.002 * (attempt + 1))

    @staticmethod
    def _kill(directory: str) -> None:
        # Normally empty by now (the sandbox's pid 1 has been reaped, so its namespace is gone);
        # this only cleans up after a sandbox that failed to die with its parent.
        try:
            with open(os.path.join(directory, "cgroup.kill"), "w") as f:  # cgroup v2, Linux 5.14+
                f.write("1")
            return
        except OSError:
            pass
        try:
            with open(os.path.join(directory, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
