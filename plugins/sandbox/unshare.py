"""The ``unshare`` backend: a launcher run in the child as ``python -c LAUNCHER`` that builds the
namespaces and the root file system with ``unshare(2)``, ``mount(2)`` and ``pivot_root(2)`` through
``ctypes``, then becomes the harness; and the command that starts it."""

from __future__ import annotations

import marshal

from .runtime import ENV, SANDBOX_UID, Limits, Runtime
from .seccomp import _MOUNT_SETATTR, _PIVOT_ROOT, _arch


def unshare_command(runtime: Runtime, limits: Limits, seccomp: bytes | None, drop_root: bool,
                    argv: list[str]) -> list[str]:
    """The launcher command that runs ``argv`` in the sandbox (as host uid 65534 when ``drop_root``)."""
    config = {
        "binds": list(runtime.binds), "symlinks": [list(s) for s in runtime.symlinks],
        "disk": limits.disk_mb << 20, "env": ENV, "argv": argv, "uid": SANDBOX_UID,
        "drop_root": drop_root, "seccomp": seccomp or b"",
        "pivot_root": _PIVOT_ROOT.get(_arch() or "", 0), "mount_setattr": _MOUNT_SETATTR,
    }
    return [runtime.python, "-I", "-S", "-B", "-c", LAUNCHER, marshal.dumps(config).hex()]


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
