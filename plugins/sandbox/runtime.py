"""What a sandboxed interpreter is given: the host runtime directories bound into the sandbox
(discovered from the running interpreter), its environment and uid, and its resource limits."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

SANDBOX_UID = 65534  # "nobody": the uid inside the sandbox, and the host uid of a root trainer's sandbox
ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): it could not be set up or did not start."""


@dataclass(frozen=True)
class Limits:
    timeout: float = 5.0  # wall-clock seconds for the whole sandboxed run
    memory_mb: int = 1024  # address space per process; with a cgroup also the whole program's memory
    max_file_mb: int = 16  # largest file (and standard output) a process may write
    disk_mb: int = 64  # size of the private /tmp
    max_processes: int = 16  # processes and threads the program may have (the harness not counted)
    max_open_files: int = 256

    def rlimits(self) -> dict[str, int]:
        return {
            "RLIMIT_CPU": int(math.ceil(self.timeout)) + 1,
            "RLIMIT_AS": self.memory_mb << 20,
            "RLIMIT_FSIZE": self.max_file_mb << 20,
            "RLIMIT_NOFILE": self.max_open_files,
            "RLIMIT_NPROC": self.max_processes + 1,  # + the harness
            "RLIMIT_CORE": 0,
            "RLIMIT_MSGQUEUE": 0,
            "RLIMIT_MEMLOCK": 0,
        }


@dataclass(frozen=True)
class Runtime:
    """The host paths a sandboxed interpreter needs, and how it is started."""

    python: str  # the interpreter (sys.executable)
    binds: tuple[str, ...]  # directories and files bound read-only at the same path
    symlinks: tuple[tuple[str, str], ...]  # (target, path) links recreated inside (e.g. /lib -> usr/lib)
    site: tuple[str, ...]  # site-packages directories added to sys.path by the harness

    @classmethod
    def current(cls) -> "Runtime":
        candidates = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"]
        for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix):
            candidates.append(os.path.abspath(prefix))
            candidates.append(os.path.realpath(prefix))
        python = os.path.abspath(sys.executable)
        seen: list[str] = []
        links: list[tuple[str, str]] = []
        for path in candidates:
            if not os.path.lexists(path) or path in seen or any(l[1] == path for l in links):
                continue
            if os.path.islink(path) and os.path.dirname(path) == "/":
                links.append((os.readlink(path), path))  # merged /usr: /lib -> usr/lib
                continue
            seen.append(path)
        dirs = sorted((p for p in seen if os.path.isdir(p)), key=len)
        binds: list[str] = []
        for path in dirs:
            if not any(path == b or path.startswith(b.rstrip("/") + "/") for b in binds):
                binds.append(path)
        for extra in ("/etc/ld.so.cache",):
            if os.path.isfile(extra):
                binds.append(extra)
        covered = lambda p: any(p == b or p.startswith(b.rstrip("/") + "/") for b in binds)  # noqa: E731
        if not covered(python) or not covered(os.path.realpath(python)):
            raise SandboxError(f"the interpreter {python} is outside the runtime directories {binds}")
        site = tuple(p for p in sys.path if p and os.path.isdir(p) and covered(os.path.realpath(p))
                     and os.path.basename(p.rstrip("/")) in ("site-packages", "dist-packages"))
        return cls(python=python, binds=tuple(binds), symlinks=tuple(links), site=site)
