"""Running one job: the sandbox command for a backend (under the program's cgroup), the job and
report channels, the wall-clock timeout that kills the whole sandbox, and the result."""

from __future__ import annotations

import marshal
import os
import select
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from .bwrap import bwrap_command
from .cgroups import _JOIN, Cgroups
from .harness import HARNESS
from .runtime import ENV, Limits, Runtime, SandboxError
from .seccomp import seccomp_filter
from .unshare import unshare_command

_REPORT_LIMIT_SLACK = 1 << 20


@dataclass
class RunResult:
    report: bytes  # what the harness wrote on its report channel (starts with b"R\n" once it ran)
    diagnostics: bytes  # the sandbox's standard error before the program ran (setup errors)
    returncode: int | None
    timed_out: bool
    seconds: float = 0.0

    @property
    def started(self) -> bool:
        return self.report.startswith(b"R\n")


class Sandbox:
    """Runs harness jobs in one backend with fixed limits. ``run`` is thread-safe."""

    def __init__(self, backend: str, limits: Limits, runtime: Runtime | None = None,
                 cgroups: Cgroups | None = None):
        if backend not in ("bwrap", "unshare", "none"):
            raise ValueError(f"unknown sandbox backend {backend!r}")
        self.backend = backend
        self.limits = limits
        self.runtime = runtime or Runtime.current()
        self.cgroups = cgroups
        self.seccomp = seccomp_filter() if backend != "none" else None
        self.bwrap = shutil.which("bwrap") if backend == "bwrap" else None
        self._drop_root = backend == "unshare" and os.geteuid() == 0

    @property
    def isolated(self) -> bool:
        return self.backend != "none"

    def describe(self) -> str:
        parts = [self.backend]
        if self.isolated:
            parts.append("seccomp" if self.seccomp else "no seccomp filter on this architecture")
            parts.append(self.cgroups.describe() if self.cgroups else "rlimits only (no usable cgroup)")
        return ", ".join(parts)

    # The command for each backend; `fds` are passed through at the same numbers.
    def _command(self, fds: list[int]) -> list[str]:
        python_args = [self.runtime.python, "-I", "-S", "-B", "-c", HARNESS]
        if self.backend == "none":
            return python_args
        if self.backend == "bwrap":
            return bwrap_command(self.bwrap, self.runtime, self.limits, self.seccomp, fds) + python_args
        return unshare_command(self.runtime, self.limits, self.seccomp, self._drop_root, python_args)

    def run(self, job: dict[str, Any], timeout: float | None = None) -> RunResult:
        """Run one harness job (see HARNESS) and return what it reported."""
        timeout = self.limits.timeout if timeout is None else timeout
        rlimits = self.limits.rlimits()
        if self.backend == "unshare":
            rlimits["RLIMIT_NPROC"] += 1  # the launcher's helper process lives in the user namespace too
        job = dict(job, rlimits=rlimits, pidns=self.isolated, site=list(self.runtime.site),
                   file_bytes=self.limits.max_file_mb << 20)
        job_fd = _memfd("rlctl-job", marshal.dumps(job))
        report_fd = _memfd("rlctl-report")
        diag_fd = _memfd("rlctl-diagnostics")
        fds: list[int] = []
        group = None
        workdir = None
        start = time.monotonic()
        try:
            cmd = self._command(fds)
            kwargs: dict[str, Any] = {}
            if self.cgroups is not None:
                group = self.cgroups.create(self.limits)
                # join the cgroups before the sandbox process starts anything
                cmd = ["/bin/sh", "-c", _JOIN, "sh", *group.procs, "--", *cmd]
            if self.backend == "none":
                workdir = _mkdtemp()
                kwargs["cwd"] = workdir
            proc = subprocess.Popen(cmd, stdin=job_fd, stdout=report_fd, stderr=diag_fd,
                                    env=ENV if self.backend != "none" else {**ENV, "HOME": workdir,
                                                                             "TMPDIR": workdir},
                                    close_fds=True, pass_fds=fds, start_new_session=True, **kwargs)
            for fd in fds:
                os.close(fd)
            fds = []
            timed_out = _wait(proc, timeout)
            returncode = None if timed_out else proc.returncode
            seconds = time.monotonic() - start
            report = _read(report_fd, self.limits.max_file_mb * 2 * 2**20 + _REPORT_LIMIT_SLACK)
            diagnostics = _read(diag_fd, 8192)
            return RunResult(report, diagnostics, returncode, timed_out, seconds)
        finally:
            for fd in (job_fd, report_fd, diag_fd, *fds):
                try:
                    os.close(fd)
                except OSError:
                    pass
            if group is not None:
                group.remove()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)

    def probe(self) -> str | None:
        """None when a trivial job runs to the end in this sandbox, else what went wrong."""
        try:
            result = self.run({"style": "probe"}, timeout=max(10.0, self.limits.timeout))
        except (OSError, SandboxError) as exc:
            return f"{type(exc).__name__}: {exc}"
        if result.report.startswith(b"R\nP\n"):
            return None
        text = result.diagnostics.decode("utf-8", "replace").strip().splitlines()
        detail = text[-1] if text else f"exit status {result.returncode}"
        return "timed out" if result.timed_out else detail


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the sandbox's first process, then kill its process group; True if it timed out.

    Killing the first process (pid 1 of the sandbox's pid namespace) makes the kernel kill every
    other process in the namespace. The group is killed while the first process is not yet reaped
    (a zombie still holds the process group id), so the id cannot have been reused.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        if pidfd is not None:
            timed_out = not select.select([pidfd], [], [], timeout)[0]
        else:  # no pidfd (old kernels): poll without reaping
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                        timed_out = False
                        break
                except ChildProcessError:
                    timed_out = False
                    break
                if time.monotonic() >= deadline:
                    timed_out = True
                    break
                time.sleep(0.002)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()
    return timed_out


def _memfd(name: str, data: bytes = b"") -> int:
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        import tempfile
        fd = os.dup(tempfile.TemporaryFile().fileno())
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read(fd: int, limit: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks, total = [], 0
    while total < limit:
        chunk = os.read(fd, min(1 << 20, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _mkdtemp() -> str:
    import tempfile
    return tempfile.mkdtemp(prefix="rlctl-sandbox-")
