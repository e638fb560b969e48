"""Code-execution reward: run generated Python against unit tests in a best-effort sandbox.

Each sample runs in its own ``python -I -B`` subprocess, in a fresh temporary directory, with a
stripped environment and its own session (process group). Before any generated code runs, a small
bootstrap in the child

* lowers resource limits (``resource.setrlimit``, soft = hard so they cannot be raised again):
  address space (``memory_mb``), CPU seconds, file size (``max_file_mb``), no core files, no new
  processes or threads (``RLIMIT_NPROC = 0``, enforced by the kernel for non-root users only);
* installs an audit hook (``sys.addaudithook``, PEP 578) that denies network sockets (every
  ``socket.*`` event except creating local AF_UNIX sockets, which cannot connect, bind or send),
  process creation (fork, exec, spawn, ``subprocess``, ``os.system``), signals, ``ctypes`` beyond
  ``import ctypes``, raising resource limits, and writes or file-system changes outside the temporary
  directory.

The parent enforces a wall-clock ``timeout`` and kills the whole process group when it expires or
when the sample finishes. This is a guard against accidents and runaway programs (infinite loops,
memory or fork bombs, stray writes, network calls), **not a security boundary**: audit hooks can be
evaded by native code, reads are not restricted, and a program that inspects the bootstrap's frames
could forge its result. Run untrusted code at scale inside a container or VM as well.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from rlctl.hookspecs import hookimpl
from rlctl.rollouts import Rollouts

# Outcomes of one sample; only "passed" scores 1.
OUTCOMES = ("passed", "failed", "errors", "blocked", "timeouts", "crashes", "no_tests")

_CODE_BLOCK = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_RESULT_TAIL = 4096  # bytes of child output searched for the result line

# Runs first in the child (passed with -c). Reads the job from stdin, limits itself, installs the
# audit hook, then executes solution and tests and prints "<nonce> <outcome>" as its last line.
BOOTSTRAP = r'''
def _rlctl_sandbox():
    import json, os, resource, sys, threading, traceback
    job = json.loads(sys.stdin.buffer.read())
    sys.stdin.close()
    nonce, root = job.pop("nonce"), os.path.realpath(job["root"])
    for name, value in job["limits"].items():
        kind = getattr(resource, name)
        soft, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(kind, (value, value))
    denied = []
    deny_prefixes = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn",
                     "os.fork", "os.system", "os.kill", "os.killpg", "signal.pthread_kill",
                     "resource.setrlimit", "resource.prlimit", "pty.", "winreg.", "msvcrt.")
    path_events = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                   "os.link", "os.symlink", "os.truncate", "os.utime", "os.chflags", "os.lchflags",
                   "os.lchmod", "os.lchown", "os.mkfifo", "os.mknod", "os.setxattr", "os.removexattr",
                   "shutil.rmtree", "shutil.chown", "tempfile.mkstemp", "tempfile.mkdtemp")
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    allowed_files = ("/dev/null",)
    socket_unix = 1  # AF_UNIX on Linux and macOS
    allow_ctypes_import = job["allow_ctypes_import"]
    local = threading.local()  # per-thread re-entrancy guard for events raised inside the hook

    def inside(path):
        if isinstance(path, int):
            return True  # an already open descriptor
        path = os.path.realpath(os.fsdecode(os.fspath(path)))
        return path == root or path.startswith(root + os.sep) or path in allowed_files

    def deny(event, args):
        denied.append(event)
        raise PermissionError(f"sandbox: {event} is not allowed")

    def hook(event, args):
        if getattr(local, "busy", False):
            return
        local.busy = True
        try:
            if event == "socket.__new__" and args[1] == socket_unix:
                pass  # local socket pairs (asyncio's self-pipe); connect/bind/send stay denied
            elif event == "ctypes.dlopen" and args[0] is None and allow_ctypes_import:
                pass  # "import ctypes" (numpy needs it); other libraries, symbols, raw memory denied
            elif event.startswith(deny_prefixes):
                deny(event, args)
            elif event == "open":
                path, mode, flags = args
                writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & write_flags)
                if writes and not inside(path):
                    deny(event, args)
            elif event in path_events:
                for arg in args:
                    if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                        deny(event, args)
        finally:
            local.busy = False

    import _posixsubprocess

    def no_fork_exec(*args, **kwargs):
        denied.append("_posixsubprocess.fork_exec")
        raise PermissionError("sandbox: process creation is not allowed")

    _posixsubprocess.fork_exec = no_fork_exec
    sys.addaudithook(hook)
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "<solution>", "exec"), namespace)
        exec(compile(job["tests"], "<tests>", "exec"), namespace)
        outcome = "passed"
    except AssertionError:
        outcome = "failed"
    except BaseException:
        outcome = "errors"
        try:
            traceback.print_exc(limit=5)
        except BaseException:
            pass
    if denied:
        outcome = "blocked"
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os.write(1, ("\n%s %s\n" % (nonce, outcome)).encode())
    os._exit(0)

_rlctl_sandbox()
'''


def extract_code(text: str) -> str:
    """The last fenced ```python (or ```py / unlabelled) block of ``text``; the whole text if none."""
    blocks = _CODE_BLOCK.findall(text)
    python = [body for lang, body in blocks if lang]
    chosen = python or [body for _, body in blocks]
    return chosen[-1] if chosen else text


def program_tests(info: dict[str, Any], tests_key: str) -> str | None:
    """Test code from ``info[tests_key]``: a string, or a list of statements joined by newlines.

    A HumanEval-style ``def check(candidate)`` with ``info["entry_point"]`` gets ``check(entry_point)``
    appended.
    """
    tests = info.get(tests_key)
    if tests is None:
        return None
    source = tests if isinstance(tests, str) else "\n".join(str(t) for t in tests)
    entry = info.get("entry_point")
    if entry and "def check(" in source:
        source += f"\n\ncheck({entry})\n"
    return source if source.strip() else None


class CodeExecReward:
    """1.0 when the generated program passes every test, else 0.0.

    The program is the last ```python block of the completion (``extract = true``) or the whole
    completion; the tests are ``info[tests_key]`` (assert statements, as a string or a list). Both run
    in one namespace in a sandboxed subprocess (see the module docstring) limited to ``timeout``
    wall-clock seconds, ``memory_mb`` of address space and ``max_file_mb`` per written file;
    ``workers`` samples run in parallel. ``allow_ctypes_import`` lets ``import ctypes`` succeed
    (numpy needs it; loading libraries, symbol look-ups and raw memory access stay denied); false
    denies ctypes entirely, which also makes numpy fail to import.

    After every ``score`` call, ``last_stats`` counts the samples per outcome: passed, failed (an
    assertion failed), errors (another exception, e.g. a syntax error or MemoryError), blocked (the
    sandbox denied an operation; scores 0 even if the program went on to pass), timeouts, crashes (the
    process died without reporting, e.g. killed by a limit) and no_tests (no tests in ``info``).
    ``totals`` accumulates the same counts over the component's lifetime.
    """

    def __init__(self, timeout: float = 5.0, memory_mb: int = 1024, max_file_mb: int = 16,
                 workers: int = 4, tests_key: str = "tests", extract: bool = True,
                 allow_ctypes_import: bool = True):
        if timeout <= 0:
            raise ValueError(f"timeout = {timeout}: accepted values are > 0 seconds")
        if memory_mb < 64:
            raise ValueError(f"memory_mb = {memory_mb}: accepted values are >= 64 (the interpreter "
                             "itself needs some address space)")
        if max_file_mb < 1:
            raise ValueError(f"max_file_mb = {max_file_mb}: accepted values are >= 1")
        if workers < 1:
            raise ValueError(f"workers = {workers}: accepted values are >= 1")
        self.timeout = float(timeout)
        self.memory_mb = memory_mb
        self.max_file_mb = max_file_mb
        self.workers = workers
        self.tests_key = tests_key
        self.extract = extract
        self.allow_ctypes_import = allow_ctypes_import
        self.last_stats: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.totals: dict[str, int] = dict.fromkeys(OUTCOMES, 0)

    def limits(self) -> dict[str, int]:
        cpu = int(self.timeout) + 1
        return {
            "RLIMIT_AS": self.memory_mb * 2**20,
            "RLIMIT_CPU": cpu,
            "RLIMIT_FSIZE": self.max_file_mb * 2**20,
            "RLIMIT_CORE": 0,
            "RLIMIT_NPROC": 0,
        }

    def run(self, code: str, tests: str) -> str:
        """Run one program against its tests; returns its outcome (one of ``OUTCOMES``)."""
        root = tempfile.mkdtemp(prefix="rlctl-exec-")
        nonce = secrets.token_hex(16)
        job = json.dumps({"nonce": nonce, "root": root, "code": code, "tests": tests, "limits": self.limits(),
                          "allow_ctypes_import": self.allow_ctypes_import}).encode()
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": root, "TMPDIR": root,
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            with tempfile.TemporaryFile() as out:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", "-c", BOOTSTRAP], cwd=root, env=env,
                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True)
                try:
                    proc.communicate(job, timeout=self.timeout)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(proc.pid)
                    proc.wait()
                if timed_out:
                    return "timeouts"
                return _read_outcome(out, nonce)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        jobs = []
        for text, info in zip(rollouts.completions, rollouts.info):
            jobs.append((extract_code(text) if self.extract else text, program_tests(info, self.tests_key)))

        def one(job: tuple[str, str | None]) -> str:
            code, tests = job
            return "no_tests" if tests is None else self.run(code, tests)

        with ThreadPoolExecutor(max_workers=min(self.workers, max(1, len(jobs)))) as pool:
            outcomes = list(pool.map(one, jobs))
        self.last_stats = {k: outcomes.count(k) for k in OUTCOMES}
        for k, v in self.last_stats.items():
            self.totals[k] += v
        return torch.tensor([float(o == "passed") for o in outcomes], dtype=torch.float32)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_outcome(out: Any, nonce: str) -> str:
    out.seek(0, os.SEEK_END)
    out.seek(max(0, out.tell() - _RESULT_TAIL))
    tail = out.read().decode("utf-8", errors="replace")
    for line in reversed(tail.splitlines()):
        if line.startswith(nonce + " "):
            outcome = line.split(" ", 1)[1].strip()
            return outcome if outcome in OUTCOMES else "crashes"
    return "crashes"


@hookimpl
def rlctl_register_rewards(register):
    register("code_exec", CodeExecReward)
