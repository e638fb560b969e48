"""Kernel-enforced sandbox for untrusted Python programs (used by the ``code_exec`` reward).

This module is the public API: it chooses and checks a backend (``open_sandbox``) and hardens the
trainer process (``make_non_dumpable``). The parts live in ``runtime`` (runtime directories,
environment, limits), ``seccomp``, ``cgroups``, ``bwrap`` and ``unshare`` (the two backends),
``harness`` (the code run inside the sandbox) and ``runner`` (running one job).

Every program runs in a fresh process tree inside new **user, pid, network, mount, IPC and UTS
namespaces**. Inside, the program sees:

* its own ``/proc``, read-only (its pid namespace only: the trainer and every other host process are
  invisible);
* no network: a network namespace of its own, with nothing but a loopback device;
* a root file system built from scratch and mounted read-only: the Python runtime (``sys.prefix``,
  ``sys.base_prefix`` and their exec prefixes, ``/usr`` and the ``/lib*`` directories or links, and
  ``/etc/ld.so.cache``) bound read-only, ``/dev/{null,zero,full,random,urandom}``, and a private
  size-limited tmpfs at ``/tmp`` (its working directory, also reachable as ``/dev/shm``). Nothing else
  of the host is there: not the trainer's working directory, not ``$HOME`` or ``/root`` (beyond the
  runtime directories themselves when they live there), not the host's ``/tmp``;
* an empty environment except ``PATH``, ``LANG``, ``HOME=/tmp``, ``TMPDIR=/tmp`` and single-threaded
  BLAS settings;
* uid 65534 without capabilities, ``no_new_privs`` set, and a **seccomp** filter that refuses
  ``ptrace``, ``process_vm_readv/writev``, mount and namespace calls (``mount``, ``pivot_root``,
  ``setns``, ``unshare``, ``clone`` with namespace flags; ``clone3`` answers ENOSYS so that the C
  library falls back to ``clone``), kernel keyrings, ``bpf``, ``perf_event_open``, ``userfaultfd``,
  ``io_uring``, module loading, ``kexec``, ``reboot``, swap, accounting, quota and file-handle calls,
  and every system call of another architecture's ABI (x86-64 and AArch64; on other architectures
  no filter is installed).

Limits: CPU seconds, address space, file size, open files and processes (``setrlimit``, soft = hard,
set by the harness before any program code runs), a size-limited tmpfs, and - where the machine lets
the trainer create cgroups (v2 with delegated ``memory`` and ``pids`` controllers, or v1 ``memory`` and
``pids`` hierarchies) - a cgroup per program with ``memory.max`` (tmpfs pages included, swap off) and
``pids.max``. When no cgroup can be made, memory is limited per process by ``RLIMIT_AS`` only and the
process count by ``RLIMIT_NPROC``, which the kernel does not apply to processes whose host uid is 0:
the ``unshare`` backend runs a root trainer's sandbox as host uid 65534 for that reason.

The wall-clock timeout kills the sandbox's first process, which is pid 1 of its pid namespace; the
kernel then kills every process in the namespace, including ones that called ``setsid`` or forked
twice.

Backends (``sandbox = ...``):

``bwrap`` (primary)
    Debian's ``bubblewrap`` (``apt-get install bubblewrap``, 0.8.0 or newer): small, audited, used by
    Flatpak, runs unprivileged (no setuid needed with user namespaces) and starts in a few
    milliseconds, so it is the primary backend. Started with ``--as-pid-1`` so that no bubblewrap
    helper process (with the trainer's environment and descriptors) lives inside the namespace.
    bubblewrap maps the sandbox's uid to the trainer's own host uid. For a root trainer that is host
    uid 0, which the kernel treats specially in a few places that check the uid rather than
    capabilities (``RLIMIT_NPROC`` is not enforced; global sysctls and ``/proc/sysrq-trigger`` pass
    their permission check, hence ``/proc`` is mounted read-only in both backends), so bubblewrap
    needs a cgroup for a root trainer and ``auto`` prefers ``unshare`` there.
``unshare``
    The same isolation implemented here with ``unshare(2)``, ``mount(2)`` and ``pivot_root(2)``
    through ``ctypes`` (a short launcher process), for machines without bubblewrap and for root
    trainers: the sandbox then runs as host uid 65534. About 20 ms slower per program than bwrap.
``none``
    No isolation at all: a plain subprocess with the same resource limits, a temporary working
    directory and an empty environment. For debugging on machines without user namespaces only.

The *trainer* process marks itself non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``) when a sandbox is
built, so that no other process of its uid can read or write its memory through ``/proc/<pid>/mem``
or ptrace (the kernel still allows it to root, i.e. to processes with ``CAP_SYS_PTRACE``).

What this does not protect against: kernel vulnerabilities (the namespaces, seccomp and cgroups are
all enforced by the same kernel the program can call into), CPU side channels, denial of service
through shared resources not covered by the limits (CPU time is limited per process, not shared
fairly; disk bandwidth; kernel memory outside a memory cgroup), and anything the bound runtime
directories themselves contain.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import threading

from .bwrap import bwrap_too_old
from .cgroups import _HELPERS as _HELPERS  # the sandbox's own processes per cgroup
from .cgroups import Cgroups
from .harness import HARNESS
from .runner import RunResult, Sandbox
from .runtime import ENV, SANDBOX_UID, Limits, Runtime, SandboxError
from .seccomp import seccomp_filter, signal_handler_filter
from .unshare import LAUNCHER

__all__ = ["ENV", "HARNESS", "LAUNCHER", "MODES", "SANDBOX_UID", "Cgroups", "Limits", "RunResult",
           "Runtime", "Sandbox", "SandboxError", "detect_cgroups", "is_dumpable", "make_non_dumpable",
           "open_sandbox", "seccomp_filter", "signal_handler_filter"]

MODES = ("auto", "bwrap", "unshare", "none")

# --------------------------------------------------------------------------------------- choosing
_probe_cache: dict[tuple, str | None] = {}
_cgroup_cache: list[tuple[Cgroups | None, str]] = []
_cache_lock = threading.Lock()


def detect_cgroups() -> tuple[Cgroups | None, str]:
    with _cache_lock:
        if not _cgroup_cache:
            _cgroup_cache.append(Cgroups.detect())
        return _cgroup_cache[0]


def open_sandbox(mode: str, limits: Limits, use_cgroup: bool = True) -> Sandbox:
    """The sandbox for ``mode`` ("auto", "bwrap", "unshare" or "none"), checked by running a probe.

    Raises ``ValueError`` (one line, naming ``[[reward]] sandbox``) when it cannot be used.
    """
    if mode not in MODES:
        raise ValueError(f"[[reward]] sandbox = {mode!r}: accepted values are "
                         + ", ".join(f'"{m}"' for m in MODES))
    cgroups, cgroup_reason = detect_cgroups() if use_cgroup and mode != "none" else (None, "cgroup = false")
    if mode == "none":
        return Sandbox("none", limits)
    # bwrap runs the sandbox as the trainer's host uid; for a root trainer the unshare backend (host
    # uid 65534) is preferred: some kernel interfaces check uid 0 rather than capabilities.
    order = (["unshare", "bwrap"] if os.geteuid() == 0 else ["bwrap", "unshare"]) if mode == "auto" else [mode]
    problems = []
    for backend in order:
        if backend == "bwrap" and shutil.which("bwrap") is None:
            problems.append("bwrap: not installed (apt-get install bubblewrap)")
            continue
        if backend == "bwrap" and (problem := bwrap_too_old()):
            problems.append(f"bwrap: {problem}")
            continue
        if backend == "bwrap" and cgroups is None and os.geteuid() == 0:
            problems.append("bwrap: the trainer runs as root and no cgroup can be created "
                            f"({cgroup_reason}), so the process count cannot be limited")
            continue
        try:
            sandbox = Sandbox(backend, limits, cgroups=cgroups)
        except SandboxError as exc:
            problems.append(f"{backend}: {exc}")
            continue
        key = (backend, sandbox.runtime, cgroups is not None)
        with _cache_lock:
            cached = key in _probe_cache
            problem = _probe_cache.get(key)
        if not cached:
            problem = sandbox.probe()
            with _cache_lock:
                _probe_cache[key] = problem
        if problem is None:
            return sandbox
        problems.append(f"{backend}: {problem}")
    raise ValueError(f'[[reward]] sandbox = "{mode}": no kernel sandbox can run here ('
                     + "; ".join(problems) + '); install bubblewrap (apt-get install bubblewrap), '
                     'or set sandbox = "none" to run generated code without isolation')


# --------------------------------------------------------------------------------------- trainer
def make_non_dumpable() -> None:
    """``prctl(PR_SET_DUMPABLE, 0)`` on the calling process: other processes of the same uid (without
    CAP_SYS_PTRACE) can no longer read or write its memory, descriptors or environment via /proc."""
    if not sys.platform.startswith("linux"):
        return  # no /proc/<pid>/mem to protect
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(err)}")


def is_dumpable() -> bool:
    if not sys.platform.startswith("linux"):
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(3, 0, 0, 0, 0) == 1  # PR_GET_DUMPABLE
