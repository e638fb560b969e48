"""The code_exec sandbox under attack: each test runs an adversarial program through the reward and
checks on the host that the attack had no effect. Where it is cheap and harmless, a canary runs the
same attack with ``sandbox = "none"`` against a test-owned target (a victim process, a temporary
directory, a local server) to show that the attack itself works.

These tests need user namespaces (and bubblewrap for the "bwrap" backend); they fail, not skip,
where the kernel sandbox is unavailable.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from rlctl import plugins
from rlctl.rollouts import Rollouts
from rlctl_plugins import sandbox as sb
from rlctl_plugins.code_exec import OUTCOMES, Suite

TIMEOUT = 3.0
BACKENDS = ["bwrap", "unshare"]
CONTAINED = Suite("stdio", inputs=[""], outputs=["contained\n"])
ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
CORRECT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"


def code_exec(**options):
    return plugins.get("reward", "code_exec")(**options)


def make_rollouts(completions, infos) -> Rollouts:
    n = len(completions)
    return Rollouts(
        prompt_ids=torch.ones(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.ones(n, 1, dtype=torch.long), completion_mask=torch.ones(n, 1, dtype=torch.long),
        group_ids=torch.arange(n), prompts=[""] * n, completions=list(completions), info=list(infos))


@pytest.fixture(scope="module", params=BACKENDS)
def reward(request):
    return code_exec(sandbox=request.param, timeout=TIMEOUT, memory_mb=512, max_processes=8, disk_mb=16,
                     max_file_mb=4, workers=4)


@pytest.fixture(scope="module")
def unsafe():
    return code_exec(sandbox="none", timeout=TIMEOUT, memory_mb=512, max_file_mb=4)


def program(text: str, **values) -> str:
    text = textwrap.dedent(text)
    for key, value in values.items():
        text = text.replace(key, repr(value))
    return text


# A process with a canary in its memory and a secret in its environment, for the canaries.
VICTIM = textwrap.dedent("""
    import ctypes, os, sys
    ctypes.CDLL(None).prctl(0x59616D61, ctypes.c_ulong(-1), 0, 0, 0)  # Yama: PR_SET_PTRACER_ANY, where present
    buf = bytearray(b"CANARY-UNTOUCHED")
    addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    print(os.getpid(), addr, flush=True)
    for line in sys.stdin:
        print(bytes(buf).decode(errors="replace"), flush=True)
""")


@pytest.fixture
def victim():
    proc = subprocess.Popen([sys.executable, "-c", VICTIM], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "RLCTL_VICTIM_SECRET": "victim-secret-6d2f"})
    pid, addr = map(int, proc.stdout.readline().split())

    def canary() -> str:
        proc.stdin.write("?\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    yield proc, pid, addr, canary
    proc.kill()
    proc.wait()


def trainer_canary():
    buf = bytearray(b"TRAINER-CANARY-OK")
    return buf, ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


# ----------------------------------------------------------------------------- trainer memory
MEM_ATTACK = """
import os
hit = []
for pid in sorted({PID, os.getppid(), 1}):
    for mode in ("r+b", "rb"):
        try:
            with open(f"/proc/{pid}/mem", mode, buffering=0) as f:
                f.seek(ADDR)
                if mode == "r+b":
                    f.write(b"PWNED-BY-SANDBOX!")
                else:
                    data = f.read(17)
                    if data.startswith((b"TRAINER", b"CANARY")):
                        hit.append((pid, mode, data))
                    continue
                hit.append((pid, mode))
        except (OSError, ValueError, OverflowError):
            pass
print("escaped", hit) if any(h[0] == PID for h in hit) else print("contained")
"""


def test_trainer_memory_via_proc_mem_is_unreachable(reward, victim):
    buf, addr = trainer_canary()
    outcome = reward.run(program(MEM_ATTACK, PID=os.getpid(), ADDR=addr), CONTAINED)
    assert outcome == "passed"
    assert bytes(buf) == b"TRAINER-CANARY-OK"
    # the same program against a victim process of ours: contained too
    _, pid, vaddr, canary = victim
    assert reward.run(program(MEM_ATTACK, PID=pid, ADDR=vaddr), CONTAINED) == "passed"
    assert canary() == "CANARY-UNTOUCHED"


def test_canary_proc_mem_attack_works_unsandboxed(unsafe, victim):
    _, pid, addr, canary = victim
    assert unsafe.run(program(MEM_ATTACK, PID=pid, ADDR=addr), CONTAINED) == "failed"  # it printed "escaped"
    assert canary() == "PWNED-BY-SANDBOX"


DROP_CAPS = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
assert libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) == 0  # no privileges, same uid
"""
READ_MEM = DROP_CAPS + """
pid, addr = int(sys.argv[1]), int(sys.argv[2])
try:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(addr)
        print("read", f.read(8))
except OSError as exc:
    print("denied", exc.errno)
"""
PEER = DROP_CAPS + """
import os
if sys.argv[1] == "non-dumpable":
    assert libc.prctl(4, 0, 0, 0, 0) == 0
else:
    libc.prctl(0x59616D61, ctypes.c_ulong(-1), 0, 0, 0)  # Yama: PR_SET_PTRACER_ANY, where present
buf = bytearray(b"CANARY-PEER")
print(os.getpid(), ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf)), flush=True)
sys.stdin.read()
"""


def test_trainer_is_non_dumpable_for_plain_same_uid_children(reward):
    """The trainer marked itself non-dumpable; a plain (unsandboxed) child of the same uid without
    privileges cannot read its memory. Canary: between two such unprivileged processes, memory is
    readable unless the target is non-dumpable, which is what the trainer does."""
    assert not sb.is_dumpable()
    read = lambda pid, a: subprocess.run([sys.executable, "-c", READ_MEM, str(pid), str(a)],  # noqa: E731
                                         capture_output=True, text=True, timeout=30).stdout
    buf, addr = trainer_canary()
    assert read(os.getpid(), addr).startswith("denied")
    outcomes = {}
    for kind in ("dumpable", "non-dumpable"):
        peer = subprocess.Popen([sys.executable, "-c", PEER, kind], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            pid, paddr = map(int, peer.stdout.readline().split())
            outcomes[kind] = read(pid, paddr)
        finally:
            peer.kill()
            peer.wait()
    assert outcomes["dumpable"].startswith("read b'CANARY-P")
    assert outcomes["non-dumpable"].startswith("denied")


# ----------------------------------------------------------------------------- network, native code
@pytest.fixture
def server():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    seen: list[bytes] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    seen.append(conn.recv(100))
                except OSError:
                    seen.append(b"")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], seen
    stop.set()
    thread.join()
    listener.close()


SOCKET_ATTACK = """
import socket
try:
    with socket.create_connection(("127.0.0.1", PORT), timeout=1) as s:
        s.sendall(b"exfiltrated")
    print("escaped")
except OSError:
    print("contained")
"""


def test_socket_to_a_loopback_server_on_the_host_does_not_connect(reward, server):
    port, seen = server
    assert reward.run(program(SOCKET_ATTACK, PORT=port), CONTAINED) == "passed"
    time.sleep(0.3)
    assert seen == []


def test_canary_socket_attack_connects_unsandboxed(unsafe, server):
    port, seen = server
    assert unsafe.run(program(SOCKET_ATTACK, PORT=port), CONTAINED) == "failed"
    time.sleep(0.3)
    assert seen == [b"exfiltrated"]


CTYPES_SYSTEM = """
import ctypes
libc = ctypes.CDLL(None)
libc.system(b"echo pwned > " + TARGET.encode() + b" 2>/dev/null")
print("contained")
"""


def test_ctypes_system_cannot_create_a_host_file(reward, tmp_path):
    target = tmp_path / "from-libc-system"
    assert reward.run(program(CTYPES_SYSTEM, TARGET=str(target)), CONTAINED) == "passed"
    assert not target.exists()


def test_canary_ctypes_system_writes_the_file_unsandboxed(unsafe, tmp_path):
    target = tmp_path / "from-libc-system"
    unsafe.run(program(CTYPES_SYSTEM, TARGET=str(target)), CONTAINED)
    assert target.read_text() == "pwned\n"


# ----------------------------------------------------------------------------- signals, survivors
SIGNAL_ATTACK = """
import os, signal
for sig in (signal.SIGSTOP, signal.SIGTERM, signal.SIGKILL):
    for pid in (PID, os.getppid(), -1):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
print("contained")
"""


def test_signals_to_the_trainer_have_no_effect(reward, victim):
    proc, pid, _, _ = victim
    # the trainer's pid (this process) and a victim's: neither is visible inside
    reward.run(program(SIGNAL_ATTACK, PID=os.getpid()), CONTAINED)
    reward.run(program(SIGNAL_ATTACK, PID=pid), CONTAINED)
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    assert "State:\tR" in status or "State:\tS" in status
    assert proc.poll() is None
    assert "State:\tT" not in Path(f"/proc/{pid}/status").read_text()


def test_canary_signal_kills_the_victim_unsandboxed(unsafe, victim):
    proc, pid, _, _ = victim
    unsafe.run(program("import os, signal\nos.kill(PID, signal.SIGKILL)\nprint('contained')", PID=pid),
               CONTAINED)
    assert proc.wait(timeout=10) == -signal.SIGKILL


SURVIVOR = """
import os, sys, time
marker = MARKER
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        # a grandchild in its own session that outlives its parents; it tries to write on the host
        os.execv(sys.executable, [sys.executable, "-c",
                 "import time, sys; time.sleep(WAIT); open(sys.argv[2], 'w').write('survived')", marker, HOSTFILE])
    os._exit(0)
time.sleep(0.3)
print("contained")
if LOOP:
    while True:
        time.sleep(0.1)  # no CPU time: only the wall-clock timeout ends this
"""


def orphaned_harnesses() -> list[int]:
    """Sandbox harnesses (pid 1 of their namespace) of this trainer's that outlived their launcher."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"_rlctl_harness" in cmdline and "\nPPid:\t1\n" in status:
                found.append(int(entry))
    return found


def test_a_sleeping_program_in_pid_1_is_killed_at_the_timeout(reward):
    """Assert-style programs run in the sandbox's pid 1 itself; the timeout must end them too."""
    before = set(orphaned_harnesses())
    assert reward.run("import time\nwhile True:\n    time.sleep(0.1)\n", ADD_TESTS) == "timeouts"
    time.sleep(0.5)
    assert set(orphaned_harnesses()) - before == set()


def host_processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("loop", [False, True], ids=["program-exits", "program-times-out"])
def test_setsid_double_fork_children_do_not_survive(reward, tmp_path, loop):
    marker = f"rlctl-survivor-{os.getpid()}-{time.monotonic_ns()}"
    hostfile = tmp_path / "survived"
    seen, done = [], threading.Event()

    def watch():  # the grandchild really runs (seen from the host) while the program runs
        while not done.is_set() and not seen:
            seen.extend(host_processes_with(marker))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    try:
        outcome = reward.run(program(SURVIVOR, MARKER=marker, HOSTFILE=str(hostfile), WAIT=TIMEOUT + 0.5,
                                     LOOP=loop), CONTAINED)
    finally:
        done.set()
        watcher.join()
    assert seen, "the grandchild never started"
    assert outcome == ("timeouts" if loop else "passed")
    assert time.monotonic() - start < TIMEOUT + 2
    assert host_processes_with(marker) == []
    time.sleep(TIMEOUT + 1.5 - (time.monotonic() - start) if not loop else 1.5)
    assert host_processes_with(marker) == []
    assert not hostfile.exists()


# ----------------------------------------------------------------------------- secrets on the host
ENV_ATTACK = """
import os
found = [k for k, v in os.environ.items() if "SECRET" in k]
for pid in sorted({PID, os.getppid(), 1}):
    try:
        data = open(f"/proc/{pid}/environ", "rb").read()
    except OSError:
        continue
    found += [pid] if b"SECRET" in data else []
print("escaped", found) if found else print("contained")
"""


def test_trainer_environment_is_not_readable(reward, monkeypatch, victim):
    monkeypatch.setenv("RLCTL_TRAINER_SECRET", "hunter2")
    assert reward.run(program(ENV_ATTACK, PID=os.getpid()), CONTAINED) == "passed"
    _, pid, _, _ = victim
    assert reward.run(program(ENV_ATTACK, PID=pid), CONTAINED) == "passed"


def test_canary_environment_is_readable_unsandboxed(unsafe, victim):
    _, pid, _, _ = victim
    assert unsafe.run(program(ENV_ATTACK, PID=pid), CONTAINED) == "failed"


FILES_ATTACK = """
import os
leaks = []
for path in SECRETS:  # the secret file by its host path, the trainer's working directory, the host tmp dir
    if os.path.exists(path):
        leaks.append(path)
try:
    leaks.append(open("secret.txt").read())
except OSError:
    pass
for directory, allowed in ALLOWED.items():  # $HOME, the repository: only the runtime's own directories
    if os.path.isdir(directory):
        leaks += sorted(set(os.listdir(directory)) - set(allowed))
print("escaped", leaks) if leaks else print("contained")
"""


def visible_parts(directory: str, binds) -> list[str]:
    prefix = directory.rstrip("/") + "/"
    return sorted({b[len(prefix):].split("/")[0] for b in binds if b.startswith(prefix)})


def test_trainer_cwd_home_and_tmp_are_not_visible(reward, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.txt").write_text("s3cret-in-cwd")
    secrets = [str(tmp_path / "secret.txt"), str(tmp_path), str(tmp_path.parent)]
    binds = reward.sandbox.runtime.binds
    allowed = {d: visible_parts(d, binds) for d in (str(Path.home()), str(Path(__file__).resolve().parents[1]))}
    assert reward.run(program(FILES_ATTACK, SECRETS=secrets, ALLOWED=allowed), CONTAINED) == "passed"


def test_canary_cwd_secret_is_readable_unsandboxed(unsafe, tmp_path):
    (tmp_path / "secret.txt").write_text("s3cret-in-cwd")
    code = f"print(open({str(tmp_path / 'secret.txt')!r}).read())"
    assert unsafe.run(code, Suite("stdio", inputs=[""], outputs=["s3cret-in-cwd\n"])) == "passed"


# ----------------------------------------------------------------------------- writes, memory
WRITE_ATTACK = """
import os, sqlite3, sys
made = []
targets = [TARGET_DIR, sys.prefix, "/", "/usr", "/etc", "/root"]
for directory in targets:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        continue
    try:
        os.close(os.open("pwned-dirfd", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        made.append(directory)
    except OSError:
        pass
for directory in targets:
    try:
        db = sqlite3.connect(os.path.join(directory, "pwned.sqlite"))
        db.execute("create table t (x)")
        db.commit()
        made.append("sqlite:" + directory)
    except sqlite3.Error:
        pass
print("escaped", made) if made else print("contained")
"""


def test_writes_outside_the_work_dir_do_not_reach_the_host(reward, tmp_path):
    assert reward.run(program(WRITE_ATTACK, TARGET_DIR=str(tmp_path)), CONTAINED) == "passed"
    assert list(tmp_path.iterdir()) == []
    for directory in (sys.prefix, "/", "/usr", "/etc"):
        assert not os.path.exists(os.path.join(directory, "pwned-dirfd"))
        assert not os.path.exists(os.path.join(directory, "pwned.sqlite"))


def test_canary_sqlite_writes_the_host_unsandboxed(unsafe, tmp_path):
    code = program("import sqlite3, os\ndb = sqlite3.connect(os.path.join(D, 'x.sqlite'))\n"
                   "db.execute('create table t (x)')\ndb.commit()\nprint('contained')", D=str(tmp_path))
    unsafe.run(code, CONTAINED)
    assert (tmp_path / "x.sqlite").exists()


SHM_ATTACK = """
import os
written = 0
try:
    with open("/dev/shm/big", "wb") as f:
        for _ in range(64):
            f.write(b"x" * 2**20)
            written += 1
except OSError:
    pass
os.remove("/dev/shm/big") if os.path.exists("/dev/shm/big") else None
memfd = 0
try:
    fd = os.memfd_create("big")
    for _ in range(64):
        os.write(fd, b"x" * 2**20)
        memfd += 1
except OSError:
    pass
print("contained" if written <= 16 and memfd <= 4 else f"escaped {written} {memfd}")
"""


def test_shared_memory_and_memfd_are_bounded(reward):
    assert reward.run(SHM_ATTACK, CONTAINED) == "passed"  # 16 MB of /tmp (= /dev/shm), 4 MB per file


def test_memory_bomb_across_processes_is_bounded(reward):
    bomb = ("import os\nfor _ in range(6):\n    if os.fork() == 0:\n        break\n"
            "blocks = []\nwhile True:\n    blocks.append(bytearray(32 * 2**20))\n")
    assert reward.run(bomb, CONTAINED) in ("crashes", "errors", "timeouts")


def count_forks(reward) -> int:
    result = reward.sandbox.run({"style": "stdio", "inputs": [""], "code": (
        "import os, time\nn = 0\ntry:\n    while n < 1000:\n        if os.fork() == 0:\n"
        "            time.sleep(5)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint(n)\n")})
    return int(result.report.split(b"\n", 2)[2].split()[0])


def test_process_limit_without_cgroups():
    """Without a cgroup, RLIMIT_NPROC limits processes: it needs a host uid other than 0, which the
    unshare backend provides for a root trainer; bwrap as root without a cgroup is refused."""
    reward = code_exec(sandbox="unshare", cgroup=False, timeout=TIMEOUT, max_processes=8)
    assert reward.sandbox.cgroups is None
    assert 1 <= count_forks(reward) <= 8
    if os.geteuid() == 0:
        with pytest.raises(ValueError, match="process count cannot be limited"):
            code_exec(sandbox="bwrap", cgroup=False)
    else:
        assert 1 <= count_forks(code_exec(sandbox="bwrap", cgroup=False, max_processes=8)) <= 8


def test_fork_bomb_is_bounded(reward):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    assert reward.run(bomb, CONTAINED) == "timeouts"
    assert time.monotonic() - start < TIMEOUT + 2
    assert 1 <= count_forks(reward) <= 8 + sb._HELPERS


# ----------------------------------------------------------------------------- native process creation
NATIVE_SPAWN = """
import importlib.util, os, sys
# a fresh copy of the C extension behind subprocess, and posix.fork through importlib
spec = importlib.util.find_spec("_posixsubprocess")
fresh = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fresh)
sys.modules["_posixsubprocess"] = fresh
import subprocess
out = subprocess.run(["/bin/sh", "-c", "echo $$ > /dev/null; ls /proc | grep -c '^[0-9]'; touch " + HOSTFILE + " 2>/dev/null; echo done"],
                     capture_output=True, text=True).stdout.split()
posix = importlib.import_module("posix")
pid = posix.fork()
if pid == 0:
    os._exit(7)
_, status = os.waitpid(pid, 0)
print("contained" if out[-1] == "done" and int(out[0]) <= 6 and os.waitstatus_to_exitcode(status) == 7 else f"odd {out}")
"""


def test_freshly_loaded_c_extension_spawns_only_inside(reward, tmp_path):
    hostfile = tmp_path / "spawned"
    assert reward.run(program(NATIVE_SPAWN, HOSTFILE=str(hostfile)), CONTAINED) == "passed"
    assert not hostfile.exists()
    # the same in assert-style tests: the program is correct and nothing was blocked, so it passes
    assert reward.run(program(NATIVE_SPAWN, HOSTFILE=str(hostfile)).replace("print(", "_ = (") + CORRECT,
                      ADD_TESTS) == "passed"


# ----------------------------------------------------------------------------- forged verdicts
FORGERIES = {
    "os._exit before the tests": "import os\nos._exit(0)",
    "sys.exit before the tests": "import sys\nsys.exit(0)",
    "raise SystemExit in a thread": "import threading, os\nthreading.Thread(target=lambda: os._exit(0)).start()\nimport time\ntime.sleep(1)",
    "patch builtins.AssertionError": "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})",
    "patch sys.exit and sys.excepthook": "import sys\nsys.exit = lambda *a: None\nsys.excepthook = lambda *a: None",
    "redefine print in builtins": "import builtins\nbuiltins.print = lambda *a, **k: None",
    "patch math.isclose": "import math\nmath.isclose = lambda *a, **k: True",
    "replace a module in sys.modules": "import sys, types\nsys.modules['math'] = types.ModuleType('math')",
    "shadow builtins used by the tests": "def abs(x):\n    return 0\ndef len(x):\n    return 0",
    "print a pass marker": "print('passed')\nprint('R\\nP\\n')\nimport sys\nsys.stdout.flush()",
    "write markers to every descriptor": (
        "import os\nfor fd in range(64):\n    for marker in (b'R\\n', b'P\\n', b'passed\\n', b'C []\\n', b'0 0 - 0 0\\n'):\n"
        "        try:\n            os.write(fd, marker)\n        except OSError:\n            pass"),
    "nonce from cmdline, argv, stdin, environment": (
        "import os, re, sys\nblob = open('/proc/self/cmdline', 'rb').read() + ' '.join(sys.argv).encode()\n"
        "blob += repr(dict(os.environ)).encode()\ntry:\n    blob += sys.stdin.buffer.read()\nexcept Exception:\n    pass\n"
        "for fd in range(3, 64):\n    for token in re.findall(rb'[0-9a-f]{32}', blob):\n        try:\n"
        "            os.write(fd, token + b'\\n')\n        except OSError:\n            pass"),
    "nonce from parent frames": (
        "import sys, os\ntry:\n    f = sys._getframe()\n    while f is not None:\n        for v in f.f_locals.values():\n"
        "            if isinstance(v, dict):\n                for t in v.values():\n                    if isinstance(t, bytes):\n"
        "                        for fd in range(64):\n                            try: os.write(fd, t)\n"
        "                            except OSError: pass\n        f = f.f_back\nexcept ValueError:\n    pass"),
    "nonce from gc.get_objects": (
        "import gc, os\ntry:\n    for o in gc.get_objects():\n        if isinstance(o, dict):\n            for t in list(o.values()):\n"
        "                if isinstance(t, bytes) and len(t) == 33:\n                    for fd in range(64):\n"
        "                        try: os.write(fd, t)\n                        except OSError: pass\nexcept PermissionError:\n    pass"),
    "nonce from a traceback frame": (
        "import os\ntry:\n    raise ValueError\nexcept ValueError as e:\n    try:\n        f = e.__traceback__.tb_frame\n"
        "        while f is not None:\n            os.write(2, repr(f.f_locals).encode())\n            f = f.f_back\n"
        "    except AttributeError:\n        pass"),
    "frame from a signal handler": (
        "import signal\ntry:\n    signal.signal(signal.SIGALRM, lambda s, frame: frame.f_back)\n    signal.setitimer(signal.ITIMER_REAL, 0.01)\n"
        "except OSError:\n    pass"),
    "trace function skipping asserts": (
        "import sys\ntry:\n    sys.settrace(lambda *a: None)\nexcept PermissionError:\n    pass"),
    "audit hook reading the tests": (
        "import sys\ntry:\n    sys.addaudithook(lambda e, a: None)\nexcept PermissionError:\n    pass"),
    "ctypes memory read": (
        "import ctypes\ntry:\n    ctypes.string_at(id(object()), 16)\nexcept PermissionError:\n    pass"),
    "own memory through /proc/self/mem": (
        "import os\nfor p in ('/proc/self/mem', '/proc/1/mem'):\n    try:\n        open(p, 'rb')\n    except OSError:\n        pass\n"
        "try:\n    d = os.open('/proc/self', os.O_RDONLY)\n    os.open('mem', os.O_RDONLY, dir_fd=d)\nexcept OSError:\n    pass\n"
        "try:\n    os.symlink('/proc/self/mem', '/tmp/m')\nexcept OSError:\n    pass"),
    "fork and report from the child": (
        "import os\nif os.fork():\n    os.wait()\n    os._exit(0)"),
}


def test_wrong_programs_with_forgeries_never_pass(reward):
    tests = ("import math\nassert add(2, 3) == 5\nassert abs(add(1, 1) - 2) < 1e-9\nassert len([add(0, 0)]) == 1\n"
             "assert math.isclose(add(0.5, 0.25), 0.75)\n")
    names = list(FORGERIES)
    completions = [f"```python\n{FORGERIES[n]}\n{WRONG}```" for n in names]
    scores = reward.score(make_rollouts(completions, [{"tests": tests}] * len(names)))
    assert dict(zip(names, scores.tolist())) == dict.fromkeys(names, 0.0), reward.last_stats
    # with correct code, harmless attempts (caught by the program) do not cost the pass
    harmless = ["print a pass marker", "nonce from parent frames", "frame from a signal handler",
                "trace function skipping asserts", "ctypes memory read", "nonce from a traceback frame"]
    scores = reward.score(make_rollouts([f"{FORGERIES[n]}\n{CORRECT}" for n in harmless],
                                        [{"tests": tests}] * len(harmless)))
    assert scores.tolist() == [1.0] * len(harmless), reward.last_stats


def test_forgery_outcomes_are_truthful(reward):
    run = lambda name: reward.run(f"{FORGERIES[name]}\n{CORRECT}", ADD_TESTS)  # noqa: E731
    assert run("os._exit before the tests") == "crashes"  # ended without a verdict
    assert run("sys.exit before the tests") == "errors"
    assert run("patch builtins.AssertionError") == "tampered"
    assert run("patch sys.exit and sys.excepthook") == "tampered"
    assert run("redefine print in builtins") == "tampered"


EXPECTED_HUNT = """
import os, re, sys
blob = open("/proc/self/cmdline", "rb").read() + repr(sys.argv).encode() + repr(dict(os.environ)).encode()
blob += sys.stdin.buffer.read()
for root, dirs, files in os.walk("/tmp"):
    # skip the read-only runtime, bound in when it lives below /tmp (a venv in /tmp/x)
    dirs[:] = [d for d in dirs if not os.statvfs(os.path.join(root, d)).f_flag & os.ST_RDONLY]
    for f in files:
        blob += open(os.path.join(root, f), "rb").read()
print("escaped" if b"expected-7391" in blob else "contained")
"""


def test_expected_values_never_enter_the_sandbox(reward):
    stdio = Suite("stdio", inputs=["question\n"], outputs=["expected-7391\n"])
    assert reward.run(EXPECTED_HUNT.replace('"escaped" if', '"expected-7391" if'), stdio) == "failed"
    report = reward.sandbox.run({"style": "stdio", "code": EXPECTED_HUNT, "inputs": ["question\n"]}).report
    assert b"contained" in report
    call = Suite("call", inputs=[[1]], outputs=["expected-7391"], fn_name="f")
    hunt = EXPECTED_HUNT.replace("sys.stdin.buffer.read()", "b''").replace("print(", "result = (")
    assert reward.run(hunt + "\ndef f(x):\n    return result\n", call) == "failed"
    assert reward.run("def f(x):\n    return 'expected-7391'\n", call) == "passed"


# ----------------------------------------------------------------------------- controls
CONTROL_TESTS = {
    "assert": ADD_TESTS,
    "stdio": {"inputs": ["2 3\n", "-1 1\n"], "outputs": ["5\n", "0\n"]},
    "call": {"fn_name": "add", "inputs": [[2, 3], [-1, 1]], "outputs": [5, 0]},
}
CONTROL_PROGRAMS = {
    "assert": {"correct": CORRECT, "wrong": WRONG},
    "stdio": {"correct": "a, b = map(int, input().split())\nprint(a + b)\n",
              "wrong": "a, b = map(int, input().split())\nprint(a - b)\n"},
    "call": {"correct": CORRECT, "wrong": WRONG},
}


@pytest.mark.parametrize("style", list(CONTROL_TESTS))
def test_controls(reward, style):
    programs = {
        **CONTROL_PROGRAMS[style],
        "infinite loop": "while True:\n    pass\n",
        "syntax error": "def add(a, b) return\n",
        "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 2**20))\n",
        "exception": "raise ValueError('no')\n",
    }
    expected = {"correct": "passed", "wrong": "failed", "infinite loop": "timeouts", "syntax error": "errors",
                "memory bomb": "crashes", "exception": "errors"}
    scores = reward.score(make_rollouts(list(programs.values()), [{"tests": CONTROL_TESTS[style]}] * len(programs)))
    outcomes = {name: reward.run(code, _parse(CONTROL_TESTS[style])) for name, code in programs.items()
                if name not in ("infinite loop",)}
    assert outcomes == {k: v for k, v in expected.items() if k != "infinite loop"}
    assert scores.tolist() == [1.0] + [0.0] * (len(programs) - 1)
    assert reward.last_stats["timeouts"] == 1 and reward.last_stats["passed"] == 1


def _parse(tests):
    from rlctl_plugins.code_exec import parse_tests
    return parse_tests({"tests": tests}, "tests")


def test_stdio_and_call_details(reward):
    stdio = Suite("stdio", inputs=["3\n", "4\n"], outputs=["9\n", "16"])
    assert reward.run("n = int(input())\nprint(n * n)  \n\n", stdio) == "passed"
    assert reward.run("import sys\nprint(int(input()) ** 2)\nsys.exit(0)\n", stdio) == "passed"
    assert reward.run("import sys\nprint(int(input()) ** 2)\nsys.exit(3)\n", stdio) == "errors"
    assert reward.run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", stdio) in ("crashes", "errors")
    assert reward.run("print('x' * (8 * 2**20))\n", stdio) in ("failed", "errors")  # beyond max_file_mb
    call = Suite("call", inputs=[[[1, 2]], [[]]], outputs=[[2, 1], []], fn_name="rev")
    assert reward.run("def rev(xs):\n    return tuple(reversed(xs))\n", call) == "passed"
    assert reward.run("class Solution:\n    def rev(self, xs):\n        return xs[::-1]\n", call) == "passed"
    assert reward.run("def rev(xs):\n    return {1, 2}\n", call) == "failed"  # not JSON: never equal
    assert reward.run("def rev(xs):\n    raise KeyError\n", call) == "errors"
    assert reward.run("def other(xs):\n    return xs\n", call) == "errors"


def test_sandbox_none_warns_on_every_construction(capfd):
    for _ in range(2):
        code_exec(sandbox="none")
    err = capfd.readouterr().err
    assert err.count('sandbox = "none"') == 2 and "WITHOUT isolation" in err


def test_unavailable_sandbox_is_refused_with_one_line(monkeypatch):
    monkeypatch.setattr(sb.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r'\[\[reward\]\] sandbox = "bwrap": .*not installed') as info:
        code_exec(sandbox="bwrap")
    assert "\n" not in str(info.value)
    monkeypatch.setattr(sb.Sandbox, "probe", lambda self: "unshare: Operation not permitted")
    monkeypatch.setattr(sb, "_probe_cache", {})
    with pytest.raises(ValueError, match=r'\[\[reward\]\] sandbox = "auto".*sandbox = "none"'):
        code_exec(sandbox="auto")


def test_seccomp_refuses_ptrace_and_namespaces(reward):
    code = textwrap.dedent("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        results = []
        for call in (lambda: libc.ptrace(0, 0, 0, 0), lambda: libc.unshare(0x10000000), lambda: libc.unshare(0x20000),
                     lambda: libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)):
            results.append((call(), ctypes.get_errno()))
        print("contained" if all(r == -1 and e == 1 for r, e in results) else f"escaped {results}")
    """)
    assert reward.run(code, CONTAINED) == "passed"
    assert "seccomp" in reward.isolation


PROC_ATTACK = """
import os
wrote = []
for path in ("/proc/sys/kernel/printk_ratelimit", "/proc/sys/vm/swappiness"):
    try:
        value = open(path).read()
        with open(path, "w") as f:
            f.write(value)  # the same value: harmless if it gets through
        wrote.append(path)
    except OSError:
        pass
# a read-only /proc also covers /proc/sysrq-trigger, which is never written here
print("contained" if not wrote and os.statvfs("/proc").f_flag & os.ST_RDONLY else f"escaped {wrote}")
"""


def test_proc_is_read_only_so_host_sysctls_are_not_writable(reward):
    assert reward.run(PROC_ATTACK, CONTAINED) == "passed"


def test_auto_prefers_a_sandbox_that_is_not_host_root():
    reward = code_exec(timeout=TIMEOUT)
    assert reward.sandbox.backend == ("unshare" if os.geteuid() == 0 else "bwrap")
    uid = reward.sandbox.run({"style": "stdio", "inputs": [""], "code": (
        "import os\nprint(os.getuid(), open('/proc/self/uid_map').read().split())")}).report.split(b"\n", 2)[2]
    assert uid.startswith(b"65534")
    if os.geteuid() == 0:
        assert b"'65534', '65534', '1'" in uid  # host uid 65534, not 0


def test_outcome_names_are_stable():
    assert OUTCOMES == ("passed", "failed", "errors", "timeouts", "crashes", "tampered", "no_tests")
