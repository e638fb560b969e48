"""Kernel-enforced sandbox for untrusted Python programs (used by the ``code_exec`` reward).

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
import marshal
import math
import os
import platform
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

SANDBOX_UID = 65534  # "nobody": the uid inside the sandbox, and the host uid of a root trainer's sandbox
MODES = ("auto", "bwrap", "unshare", "none")
_REPORT_LIMIT_SLACK = 1 << 20
# sh -c _JOIN sh <cgroup.procs files> -- <command>: join the cgroups, then become the command
_JOIN = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
_HELPERS = 4  # processes of the sandbox itself in its cgroup: bwrap or the launcher, the harness
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


# --------------------------------------------------------------------------------------- limits
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


# --------------------------------------------------------------------------------------- seccomp
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SYSCALLS = {  # the refused calls, per architecture
    "x86_64": dict(
        ptrace=101, process_vm_readv=310, process_vm_writev=311, kcmp=312, keyctl=250, add_key=248,
        request_key=249, bpf=321, perf_event_open=298, userfaultfd=323, kexec_load=246,
        kexec_file_load=320, init_module=175, finit_module=313, delete_module=176, iopl=172, ioperm=173,
        mount=165, umount2=166, pivot_root=155, swapon=167, swapoff=168, reboot=169, setns=308,
        unshare=272, open_by_handle_at=304, name_to_handle_at=303, io_uring_setup=425,
        io_uring_enter=426, io_uring_register=427, acct=163, quotactl=179, quotactl_fd=443, syslog=103,
        vhangup=153, lookup_dcookie=212, uselib=134, open_tree=428, move_mount=429, fsopen=430,
        fsconfig=431, fsmount=432, fspick=433, mount_setattr=442),
    "aarch64": dict(
        ptrace=117, process_vm_readv=270, process_vm_writev=271, kcmp=272, keyctl=219, add_key=217,
        request_key=218, bpf=280, perf_event_open=241, userfaultfd=282, kexec_load=104,
        kexec_file_load=294, init_module=105, finit_module=273, delete_module=106, mount=40, umount2=39,
        pivot_root=41, swapon=224, swapoff=225, reboot=142, setns=268, unshare=97,
        open_by_handle_at=265, name_to_handle_at=264, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, acct=89, quotactl=60, quotactl_fd=443, syslog=116, vhangup=58,
        lookup_dcookie=18, open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432,
        fspick=433, mount_setattr=442),
}
_CLONE = {"x86_64": 56, "aarch64": 220}
_CLONE3 = 435
_RT_SIGACTION = {"x86_64": 13, "aarch64": 134}
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_MOUNT_SETATTR = 442
_CLONE_NS_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_EPERM, _ENOSYS = 1, 38


class _BPF:
    """A tiny assembler for classic BPF seccomp programs, with forward jumps to labels."""

    LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06

    def __init__(self) -> None:
        self.code: list[tuple[int, Any, Any, int]] = []
        self.labels: dict[str, int] = {}

    def ld(self, offset: int) -> None:
        self.code.append((self.LD_ABS, 0, 0, offset))

    def jump(self, op: int, k: int, true: str | int = 0, false: str | int = 0) -> None:
        self.code.append((op, true, false, k))

    def ret(self, value: int) -> None:
        self.code.append((self.RET, 0, 0, value))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        out = []
        for i, (op, jt, jf, k) in enumerate(self.code):
            jt = self.labels[jt] - i - 1 if isinstance(jt, str) else jt
            jf = self.labels[jf] - i - 1 if isinstance(jf, str) else jf
            if not (0 <= jt < 256 and 0 <= jf < 256):
                raise ValueError("seccomp program too long for a jump")
            out.append(struct.pack("=HBBI", op, jt, jf, k))
        return b"".join(out)


def _arch() -> str | None:
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return arch if arch in _AUDIT_ARCH and sys.byteorder == "little" and struct.calcsize("P") == 8 else None


def seccomp_filter() -> bytes | None:
    """The sandbox's seccomp program (None on architectures without a syscall table here)."""
    arch = _arch()
    if arch is None:
        return None
    p = _BPF()
    p.ld(4)  # seccomp_data.arch
    p.jump(_BPF.JEQ, _AUDIT_ARCH[arch], "native", 0)
    p.ret(_RET_ERRNO | _ENOSYS)  # another ABI (e.g. i386 through int 0x80): refuse every call
    p.label("native")
    p.ld(0)  # seccomp_data.nr
    if arch == "x86_64":
        p.jump(_BPF.JGE, 0x40000000, "enosys", 0)  # the x32 ABI
    for nr in sorted(set(_SYSCALLS[arch].values())):
        p.jump(_BPF.JEQ, nr, "eperm", 0)
    p.jump(_BPF.JEQ, _CLONE3, "enosys", 0)
    p.jump(_BPF.JEQ, _CLONE[arch], "clone", 0)
    p.ret(_RET_ALLOW)
    p.label("clone")
    p.ld(16)  # low 32 bits of args[0]: the clone flags
    p.jump(_BPF.JSET, _CLONE_NS_FLAGS, "eperm", 0)
    p.ret(_RET_ALLOW)
    p.label("eperm")
    p.ret(_RET_ERRNO | _EPERM)
    p.label("enosys")
    p.ret(_RET_ERRNO | _ENOSYS)
    return p.assemble()


def signal_handler_filter() -> bytes | None:
    """Refuses installing signal handlers (``rt_sigaction`` with a new action); used by assert-style
    tests, where a Python signal handler would receive the harness's stack frame."""
    arch = _arch()
    if arch is None:
        return None
    p = _BPF()
    p.ld(4)
    p.jump(_BPF.JEQ, _AUDIT_ARCH[arch], 0, "allow")
    p.ld(0)
    p.jump(_BPF.JEQ, _RT_SIGACTION[arch], 0, "allow")
    p.ld(24)  # args[1] (the new action), low and high halves
    p.jump(_BPF.JEQ, 0, 0, "eperm")
    p.ld(28)
    p.jump(_BPF.JEQ, 0, "allow", "eperm")
    p.label("allow")
    p.ret(_RET_ALLOW)
    p.label("eperm")
    p.ret(_RET_ERRNO | _EPERM)
    return p.assemble()


# --------------------------------------------------------------------------------------- runtime
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


# --------------------------------------------------------------------------------------- cgroups
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


# --------------------------------------------------------------------------------------- running
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
            cmd = [self.bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                   "--unshare-uts", "--unshare-cgroup-try", "--disable-userns", "--die-with-parent",
                   "--new-session", "--as-pid-1", "--cap-drop", "ALL", "--uid", str(SANDBOX_UID),
                   "--gid", str(SANDBOX_UID), "--hostname", "sandbox", "--clearenv"]
            for key, value in ENV.items():
                cmd += ["--setenv", key, value]
            # the private /tmp first: a runtime that lives below /tmp (a venv in /tmp/x) is bound over it
            cmd += ["--size", str(self.limits.disk_mb << 20), "--tmpfs", "/tmp"]
            for path in self.runtime.binds:
                cmd += ["--ro-bind", path, path]
            for target, path in self.runtime.symlinks:
                cmd += ["--symlink", target, path]
            cmd += ["--proc", "/proc", "--dir", "/dev"]
            for dev in ("null", "zero", "full", "random", "urandom"):
                cmd += ["--dev-bind", f"/dev/{dev}", f"/dev/{dev}"]
            for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                                 ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
                cmd += ["--symlink", target, f"/dev/{name}"]
            cmd += ["--symlink", "/tmp", "/dev/shm", "--chdir", "/tmp"]
            if self.seccomp is not None:
                r, w = os.pipe()
                os.write(w, self.seccomp)
                os.close(w)
                fds.append(r)
                cmd += ["--seccomp", str(r)]
            # /proc read-only: as host uid 0 (a root trainer) sysctls and sysrq-trigger check the uid only
            cmd += ["--remount-ro", "/proc", "--remount-ro", "/", "--"]
            return cmd + python_args
        config = {
            "binds": list(self.runtime.binds), "symlinks": [list(s) for s in self.runtime.symlinks],
            "disk": self.limits.disk_mb << 20, "env": ENV, "argv": python_args, "uid": SANDBOX_UID,
            "drop_root": self._drop_root, "seccomp": self.seccomp or b"",
            "pivot_root": _PIVOT_ROOT.get(_arch() or "", 0), "mount_setattr": _MOUNT_SETATTR,
        }
        return [self.runtime.python, "-I", "-S", "-B", "-c", LAUNCHER, marshal.dumps(config).hex()]

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
        if backend == "bwrap" and (problem := _bwrap_too_old()):
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


_bwrap_help: list[str] = []


def _bwrap_too_old() -> str | None:
    """None when the installed bwrap has the options used here (bubblewrap 0.8.0 or newer)."""
    with _cache_lock:
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


# --------------------------------------------------------------------------------------- launcher
# The "unshare" backend: runs as the trainer's uid, builds the namespaces and the root file system,
# then becomes the harness (pid 1 of the new pid namespace). argv[1] is the marshalled config (hex).
LAUNCHER = r'''
import ctypes, marshal, os, select, sys
cfg = marshal.loads(bytes.fromhex(sys.argv[1]))
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.syscall.restype = ctypes.c_long

def fail(what, err=None):
    err = ctypes.get_errno() if err is None else err
    sys.stderr.write("rlctl-unshare: %s: %s\n" % (what, os.strerror(err)))
    sys.stderr.flush()
    os._exit(126)

def check(result, what):
    if result != 0:
        fail(what)

def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)
    check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), "mount %s on %s" % (src or fstype, dst))

def relay(pid):
    _, status = os.waitpid(pid, 0)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))

def die_with_parent(alive_r):
    # SIGKILL when the parent dies. A change of uid clears this, so it is set again after one.
    check(libc.prctl(1, 9, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if select.select([alive_r], [], [], 0)[0]:
        os._exit(137)  # the parent is already gone (EOF on the pipe it holds open)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWCGROUP = 0x20000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x02000000
uid, gid, inner, root = os.getuid(), os.getgid(), cfg["uid"], cfg["drop_root"]
# The launcher stays in the host namespaces; its child creates the new ones. A root launcher writes
# the child's id maps (inner uid -> host uid 65534, so that RLIMIT_NPROC applies; plus 0 -> 0 for the
# set-up, which is dropped before the program runs), which needs privileges in the parent namespace.
ready_r, ready_w = os.pipe()
go_r, go_w = os.pipe()
alive_r, alive_w = os.pipe()
child = os.fork()
if child:
    os.close(ready_w); os.close(go_r); os.close(alive_r)
    if os.read(ready_r, 1) != b"u":
        relay(child)
    if root:
        try:
            for name in ("uid_map", "gid_map"):
                with open("/proc/%d/%s" % (child, name), "w") as f:
                    f.write("0 0 1\n%d %d 1\n" % (inner, inner))
        except OSError as exc:
            fail("writing the id maps", exc.errno)
    os.write(go_w, b"m")
    os.close(go_w)
    relay(child)
os.close(ready_r); os.close(go_w); os.close(alive_w)
die_with_parent(alive_r)
os.close(alive_r)
check(libc.unshare(NEWUSER | NEWNS | NEWPID | NEWNET | NEWIPC | NEWUTS | NEWCGROUP), "unshare")
if not root:
    for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1\n" % (inner, uid)), ("gid_map", "%d %d 1\n" % (inner, gid))):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
os.write(ready_w, b"u")
os.close(ready_w)
if os.read(go_r, 1) != b"m":
    os._exit(126)
os.close(go_r)
alive_r, alive_w = os.pipe()
pid = os.fork()
if pid:
    os.close(alive_r)
    relay(pid)
# pid 1 of the new pid namespace: build the root file system, drop to the inner uid, become the harness.
os.close(alive_w)
die_with_parent(alive_r)
mount(None, "/", None, MS_REC | MS_PRIVATE)
sources = [(os.open(path, os.O_PATH | os.O_CLOEXEC), path) for path in cfg["binds"]]
devices = [(os.open("/dev/" + d, os.O_PATH | os.O_CLOEXEC), d) for d in ("null", "zero", "full", "random", "urandom")]
stage = next(d for d in ("/tmp", "/mnt", "/var/tmp", "/run", "/media", "/srv", "/opt", "/home") if os.path.isdir(d))
mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")

def inside(path):
    return stage + path

def make(path, directory):
    if directory:
        os.makedirs(path, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))

class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

def read_only(path):
    attr = MountAttr(0x1 | 0x2 | 0x4, 0, 0, 0)  # MOUNT_ATTR_RDONLY | NOSUID | NODEV
    if libc.syscall(cfg["mount_setattr"], -100, os.fsencode(path), 0x8000, ctypes.byref(attr), ctypes.sizeof(attr)) == 0:
        return  # recursive (AT_RECURSIVE), keeping the flags the kernel locks
    st = os.statvfs(path)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    for st_flag, ms_flag in ((os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, 1024), (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21)):
        if st.f_flag & st_flag:
            flags |= ms_flag
    mount(None, path, None, flags)

# the private /tmp first: a runtime that lives below /tmp (a venv in /tmp/x) is bound over it
make(inside("/tmp"), True)
mount("tmpfs", inside("/tmp"), "tmpfs", MS_NOSUID | MS_NODEV, "size=%d,mode=1777" % cfg["disk"])
for fd, path in sources:
    target = inside(path)
    make(target, os.path.isdir("/proc/self/fd/%d" % fd))
    mount("/proc/self/fd/%d" % fd, target, None, MS_BIND | MS_REC)
    read_only(target)
    os.close(fd)
for link_target, path in cfg["symlinks"]:
    os.symlink(link_target, inside(path))
make(inside("/dev"), True)
for fd, name in devices:
    make(inside("/dev/" + name), False)
    mount("/proc/self/fd/%d" % fd, inside("/dev/" + name), None, MS_BIND)
    os.close(fd)
for name, link_target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"), ("shm", "/tmp")):
    os.symlink(link_target, inside("/dev/" + name))
make(inside("/proc"), True)
mount("proc", inside("/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
mount(None, inside("/proc"), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
make(inside("/.old"), True)
check(libc.syscall(cfg["pivot_root"], os.fsencode(stage), os.fsencode(inside("/.old"))), "pivot_root")
os.chdir("/")
check(libc.umount2(b"/.old", 2), "umount /.old")  # MNT_DETACH
os.rmdir("/.old")
mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
check(libc.sethostname(b"sandbox", 7), "sethostname")
os.chdir("/tmp")
os.setsid()  # its own session and process group: kill(0, ...) cannot reach the launcher
try:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
except (OSError, ValueError):
    last_cap = 40
for cap in range(last_cap + 1):
    libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP: no capability can ever be regained
if root:
    os.setgroups([])
    os.setresgid(inner, inner, inner)
    os.setresuid(inner, inner, inner)  # from here on: host uid 65534, no capabilities
    die_with_parent(alive_r)
os.close(alive_r)
check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
if cfg["seccomp"]:
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    buf = ctypes.create_string_buffer(cfg["seccomp"], len(cfg["seccomp"]))
    prog = Prog(len(cfg["seccomp"]) // 8, ctypes.cast(buf, ctypes.c_void_p))
    check(libc.prctl(22, 2, ctypes.byref(prog), 0, 0), "seccomp")
os.closerange(3, 1 << 16)
argv = cfg["argv"]
os.execve(argv[0], argv, cfg["env"])
'''

# --------------------------------------------------------------------------------------- harness
# Runs inside the sandbox as `python -I -S -B -c HARNESS`. Standard input: the marshalled job (read
# to the end, then replaced by /dev/null); standard output: the report channel (moved to another
# descriptor, then replaced by /dev/null); standard error: setup diagnostics (replaced by /dev/null
# before program code runs). The report starts with b"R\n".
#
# Styles:
#   probe   report b"P\n"
#   stdio   run the program as __main__ once per input (a fresh fork each, stdin = the input, stdout
#           captured); report per case "exit signal exception truncated length\n" + the raw output
#   call    run the program, call job["fn_name"] with each argument list; report "C " + one JSON line
#           [{"v": json of the value} | {"e": exception type} | {"u": unserializable type}]
#   assert  run the program, then the tests, in this process; report the token of the outcome
HARNESS = r'''
def _rlctl_harness():
    import posix as os, sys
    _write, _exit, _read = os.write, os._exit, os.read
    rep = os.dup(1)
    _write(rep, b"R\n")
    chunks = []
    while True:
        chunk = _read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    import marshal, resource
    job = marshal.loads(b"".join(chunks))
    del chunks
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    keep = sorted({0, 1, 2, rep, null})
    for low, high in zip(keep, keep[1:] + [1 << 16]):
        if high > low + 1:
            os.closerange(low + 1, high)
    style = job["style"]
    sys.path.extend(job["site"])
    pid1 = bool(job["pidns"]) and os.getpid() == 1  # only then may kill(-1) be used: it stays in the namespace
    file_bytes = job["file_bytes"]
    for name, value in job["rlimits"].items():
        kind = getattr(resource, name, None)
        if kind is None:
            continue
        if name == "RLIMIT_FSIZE" and style == "stdio":
            value = 2 * value + (1 << 20)  # the harness writes the report; each case gets `value`
        soft, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))
    if style == "probe":
        _write(rep, b"P\n")
        _exit(0)
    import builtins
    import _sitebuiltins  # exit() and quit(), which `-S` leaves out
    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
    _compile, _exec, _BaseException, _MemoryError = compile, exec, BaseException, MemoryError

    def reap():
        if pid1:
            import signal
            while True:
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    return

    def write_all(fd, data):
        view = memoryview(data)
        while view:
            view = view[_write(fd, view):]

    try:
        code = _compile(job["code"], "<solution>", "exec")
    except _BaseException as exc:
        _write(rep, b"E %s\n" % type(exc).__name__.encode())
        _exit(0)

    if style == "stdio":
        used = 0
        for text in job["inputs"]:
            data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
            inp = os.memfd_create("stdin", 0)
            write_all(inp, data)
            os.lseek(inp, 0, 0)
            out = os.memfd_create("stdout", 0)
            exc_fd = os.memfd_create("exception", 0)
            pid = os.fork()
            if pid == 0:
                try:
                    os.dup2(inp, 0)
                    os.dup2(out, 1)
                    os.dup2(null, 2)
                    for fd in (inp, out, rep, null):
                        os.close(fd)
                    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
                    status = 0
                    try:
                        _exec(code, {"__name__": "__main__", "__builtins__": builtins})
                    except SystemExit as exc:
                        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                    except _BaseException as exc:
                        _write(exc_fd, type(exc).__name__.encode()[:100])
                        status = 1
                    try:
                        sys.stdout.flush()
                    except _BaseException as exc:
                        _write(exc_fd, type(exc).__name__.encode()[:100])
                        status = status or 1
                    _exit(status & 0xFF)
                finally:
                    _exit(1)
            _, status = os.waitpid(pid, 0)
            reap()
            exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
            os.lseek(exc_fd, 0, 0)
            exc_name = _read(exc_fd, 100).decode("ascii", "replace").split()[:1] or ["-"]
            size = os.fstat(out).st_size
            room = max(0, file_bytes - used)
            truncated = int(size > room)
            os.lseek(out, 0, 0)
            chunks, left = [], min(size, room)
            while left > 0:
                chunk = _read(out, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
            output = b"".join(chunks)
            used += len(output)
            for fd in (inp, out, exc_fd):
                os.close(fd)
            write_all(rep, b"%d %d %s %d %d\n" % (exit_code, sig, exc_name[0].encode(), truncated, len(output)))
            write_all(rep, output)
            if status != 0 or truncated:
                break
        _exit(0)

    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    os.dup2(null, 2)

    if style == "call":
        import json
        _dumps = json.dumps
        namespace = {"__name__": "solution", "__builtins__": builtins}
        try:
            _exec(code, namespace)
        except _BaseException as exc:
            _write(rep, b"E %s\n" % type(exc).__name__.encode())
            _exit(0)
        name = job["fn_name"]
        fn = namespace.get(name)
        if fn is None and isinstance(namespace.get("Solution"), type):
            try:
                fn = getattr(namespace["Solution"](), name, None)
            except _BaseException:
                fn = None
        if not callable(fn):
            _write(rep, b"E NameError\n")
            _exit(0)
        results = []
        for args in job["inputs"]:
            try:
                value = fn(*args)
            except _BaseException as exc:
                results.append({"e": type(exc).__name__})
                continue
            try:
                results.append({"v": _dumps(value)})
            except _BaseException:
                results.append({"u": type(value).__name__})
        write_all(rep, b"C " + _dumps(results).encode() + b"\n")
        _exit(0)

    # assert style: the tests run in this process after the program. The verdict is one of the
    # per-outcome tokens the trainer generated; the program cannot read them (below), and seeing the
    # token of its own (non-passing) outcome does not help it to forge another.
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0: no /proc/<pid>/mem for other processes
        _exit(3)
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # so that asyncio.run() does not install a handler
    guard = job["signal_filter"]
    if guard:  # no Python signal handlers: they would receive the current stack frame
        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
        buf = ctypes.create_string_buffer(guard, len(guard))
        prog = Prog(len(guard) // 8, ctypes.cast(buf, ctypes.c_void_p))
        if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:
            _exit(3)
        del buf, prog, Prog
    del libc
    tokens = {k: bytes(v) + b"\n" for k, v in job["tokens"].items()}
    try:
        tests = _compile(job["tests"], "<tests>", "exec")
    except _BaseException:
        _write(rep, tokens["errors"])
        _exit(0)
    allow_ctypes = bool(job["allow_ctypes_import"])
    del job
    for name in ("math", "operator", "functools", "itertools", "collections", "re", "string",
                 "heapq", "bisect"):
        __import__(name)
    _AssertionError, _type, _callable, _isinstance = AssertionError, type, callable, isinstance
    _get, _modules, _fspath, _basename = dict.get, sys.modules, os.fspath, None
    import posixpath
    _basename = posixpath.basename
    _gettrace, _getprofile = sys.gettrace, sys.getprofile
    immutable = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE
    snapshot = []
    for mod_name, module in list(_modules.items()):
        namespace = getattr(module, "__dict__", None)
        if not _isinstance(namespace, dict):
            continue
        items = [(k, v) for k, v in namespace.items() if _callable(v)]
        classes = []
        for _, v in items:
            if _isinstance(v, type) and not v.__flags__ & immutable:
                classes.append((v, [(k, w) for k, w in v.__dict__.items() if _callable(w)]))
        snapshot.append((mod_name, module, namespace, items, classes))
    missing = object()

    def intact():
        if _gettrace() is not None or _getprofile() is not None:
            return False
        for mod_name, module, namespace, items, classes in snapshot:
            if _get(_modules, mod_name) is not module:
                return False
            for k, v in items:
                if _get(namespace, k, missing) is not v:
                    return False
            for cls, members in classes:
                current = cls.__dict__
                for k, v in members:
                    if current.get(k, missing) is not v:
                        return False
        return True

    builtin_names = frozenset(builtins.__dict__)
    frame_attrs = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"))
    value_errors = frozenset(("sys._getframe", "sys._getframemodulename"))
    denied = frozenset(("sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                        "sys.settrace", "sys.setprofile", "sys._settraceallthreads",
                        "sys._setprofileallthreads", "sys.monitoring.register_callback",
                        "sys.addaudithook", "cpython._PySys_ClearAuditHooks"))

    def named_mem(path):
        if _isinstance(path, int):
            return False
        name = _basename(_fspath(path))
        return name in ("mem", b"mem")

    def hook(event, args):
        if event in value_errors:
            raise ValueError("the call stack is not available in assert-style tests")
        if event in denied:
            raise PermissionError("sandbox: %s is not available in assert-style tests" % event)
        if event == "object.__getattr__":
            if args[1] in frame_attrs:
                raise AttributeError("sandbox: frames are not available in assert-style tests")
        elif event.startswith("ctypes."):
            if not (event == "ctypes.dlopen" and args[0] is None and allow_ctypes):
                raise PermissionError("sandbox: ctypes is not available in assert-style tests")
        elif event == "open":
            if named_mem(args[0]):
                raise PermissionError("sandbox: process memory is not readable in assert-style tests")
        elif event == "os.symlink":
            if named_mem(args[0]):
                raise PermissionError("sandbox: process memory is not readable in assert-style tests")

    sys.addaudithook(hook)
    namespace = {"__name__": "solution", "__builtins__": builtins}
    outcome = None
    try:
        _exec(code, namespace)
    except _AssertionError:
        outcome = "failed"
    except _MemoryError:
        outcome = "crashes"
    except _BaseException:
        outcome = "errors"
    if outcome is None and not intact():
        outcome = "tampered"
    if outcome is None:
        scope = {k: v for k, v in namespace.items() if k not in builtin_names}
        scope["__builtins__"] = builtins
        scope["__name__"] = "solution"
        try:
            _exec(tests, scope)
            outcome = "passed"
        except _AssertionError:
            outcome = "failed"
        except _MemoryError:
            outcome = "crashes"
        except _BaseException:
            outcome = "errors"
        if not intact():
            outcome = "tampered"
    _write(rep, tokens[outcome])
    _exit(0)

_rlctl_harness()
'''
