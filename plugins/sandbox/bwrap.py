"""The ``bwrap`` backend: the bubblewrap command line that builds the sandbox, and the check that the
installed bubblewrap is new enough for it."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

from .runtime import ENV, SANDBOX_UID, Limits, Runtime

_bwrap_help: list[str] = []
_help_lock = threading.Lock()


def bwrap_command(bwrap: str, runtime: Runtime, limits: Limits, seccomp: bytes | None,
                  fds: list[int]) -> list[str]:
    """The bubblewrap command up to and including ``--``; the sandboxed command follows it. A pipe
    carrying the seccomp program is appended to ``fds`` (passed through at the same number)."""
    cmd = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
           "--unshare-uts", "--unshare-cgroup-try", "--disable-userns", "--die-with-parent",
           "--new-session", "--as-pid-1", "--cap-drop", "ALL", "--uid", str(SANDBOX_UID),
           "--gid", str(SANDBOX_UID), "--hostname", "sandbox", "--clearenv"]
    for key, value in ENV.items():
        cmd += ["--setenv", key, value]
    # the private /tmp first: a runtime that lives below /tmp (a venv in /tmp/x) is bound over it
    cmd += ["--size", str(limits.disk_mb << 20), "--tmpfs", "/tmp"]
    for path in runtime.binds:
        cmd += ["--ro-bind", path, path]
    for target, path in runtime.symlinks:
        cmd += ["--symlink", target, path]
    cmd += ["--proc", "/proc", "--dir", "/dev"]
    for dev in ("null", "zero", "full", "random", "urandom"):
        cmd += ["--dev-bind", f"/dev/{dev}", f"/dev/{dev}"]
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        cmd += ["--symlink", target, f"/dev/{name}"]
    cmd += ["--symlink", "/tmp", "/dev/shm", "--chdir", "/tmp"]
    if seccomp is not None:
        r, w = os.pipe()
        os.write(w, seccomp)
        os.close(w)
        fds.append(r)
        cmd += ["--seccomp", str(r)]
    # /proc read-only: as host uid 0 (a root trainer) sysctls and sysrq-trigger check the uid only
    cmd += ["--remount-ro", "/proc", "--remount-ro", "/", "--"]
    return cmd


def bwrap_too_old() -> str | None:
    """None when the installed bwrap has the options used here (bubblewrap 0.8.0 or newer)."""
    with _help_lock:
        if not _bwrap_help:
            try:
                out = subprocess.run([shutil.which("bwrap") or "bwrap", "--help"], capture_output=True,
                                     text=True, timeout=30)
                _bwrap_help.append(out.stdout + out.stderr)
            except (OSError, subprocess.SubprocessError) as exc:
                _bwrap_help.append(f"error: {exc}")
        text = _bwrap_help[0]
    missing = [opt for opt in ("--size", "--disable-userns", "--as-pid-1", "--die-with-parent") if opt not in text]
    if missing:
        return f"this bubblewrap is too old (no {', '.join(missing)}; 0.8.0 or newer is needed)"
    return None
