"""The seccomp filters (classic BPF, assembled here): the sandbox's system-call filter, and the
signal-handler filter used by assert-style tests."""

from __future__ import annotations

import platform
import struct
import sys
from typing import Any

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
