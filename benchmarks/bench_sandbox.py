"""Start-up cost and throughput of the code_exec sandbox, next to the runner it replaced.

Runners, each executing the same small program and its assert-style tests:

* ``python -c pass``: a bare interpreter start (no sandbox, nothing executed), the floor;
* ``audit hook (old)``: the previous in-process runner (``python -I -B`` + rlimits + a PEP 578 audit
  hook, no kernel isolation), copied below as it was;
* ``bwrap`` / ``unshare``: the kernel sandbox of ``rlctl_plugins.sandbox`` through the code_exec
  reward (namespaces, seccomp, limits, a cgroup where the machine allows), for each test style.

Per-program latency is the median of ``--n`` sequential runs; the overhead column is that minus the
bare interpreter's median. Throughput runs ``--batch`` programs with ``--workers`` in parallel.

    python benchmarks/bench_sandbox.py
    python benchmarks/bench_sandbox.py --n 50 --batch 128 --workers 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

CODE = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
STDIO_CODE = "a, b = map(int, input().split())\nprint(a + b)\n"

# ----------------------------------------------------------------------------- the old runner
# The previous plugins/code_exec.py runner, kept here as the comparison baseline.
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


def old_limits(timeout: float, memory_mb: int = 1024, max_file_mb: int = 16) -> dict[str, int]:
    return {"RLIMIT_AS": memory_mb * 2**20, "RLIMIT_CPU": int(timeout) + 1,
            "RLIMIT_FSIZE": max_file_mb * 2**20, "RLIMIT_CORE": 0, "RLIMIT_NPROC": 0}


def old_run(code: str, tests: str, timeout: float = 5.0) -> str:
    root = tempfile.mkdtemp(prefix="rlctl-exec-")
    nonce = secrets.token_hex(16)
    job = json.dumps({"nonce": nonce, "root": root, "code": code, "tests": tests,
                      "limits": old_limits(timeout), "allow_ctypes_import": True}).encode()
    env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": root, "TMPDIR": root,
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-c", BOOTSTRAP], cwd=root, env=env,
                                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
            try:
                proc.communicate(job, timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
            if timed_out:
                return "timeouts"
            out.seek(0)
            tail = out.read()[-4096:].decode("utf-8", "replace")
            for line in reversed(tail.splitlines()):
                if line.startswith(nonce + " "):
                    return line.split(" ", 1)[1].strip()
            return "crashes"
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------- measuring
def bare() -> str:
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return "passed"


def measure(name: str, one, n: int, batch: int, workers: int) -> dict:
    outcome = one()  # warm-up (and a check that it works)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        one()
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda _: one(), range(batch)))
    rate = batch / (time.perf_counter() - start)
    return {"name": name, "median_ms": 1000 * statistics.median(times), "rate": rate, "outcome": outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=30, help="sequential runs per runner (median)")
    parser.add_argument("--batch", type=int, default=64, help="programs in the throughput batch")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--backends", default="bwrap,unshare")
    args = parser.parse_args()

    from rlctl_plugins.code_exec import CodeExecReward, Suite

    rows = [measure("python -c pass", bare, args.n, args.batch, args.workers),
            measure("audit hook (old), assert", lambda: old_run(CODE, TESTS), args.n, args.batch, args.workers)]
    notes = []
    stdio = Suite("stdio", inputs=["2 3\n"], outputs=["5\n"])
    call = Suite("call", inputs=[[2, 3]], outputs=[5], fn_name="add")
    for backend in [b for b in args.backends.split(",") if b]:
        try:
            reward = CodeExecReward(sandbox=backend, workers=args.workers)
        except ValueError as exc:
            print(f"{backend}: not available here: {exc}", file=sys.stderr)
            continue
        for style, tests, code in (("assert", TESTS, CODE), ("stdio", stdio, STDIO_CODE), ("call", call, CODE)):
            rows.append(measure(f"{backend}, {style}", lambda: reward.run(code, tests), args.n, args.batch,
                                args.workers))
        notes.append(f"{backend}: {reward.isolation}")
    floor = rows[0]["median_ms"]
    old = rows[1]["median_ms"]
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{args.n} sequential runs (median), batch of {args.batch} with {args.workers} workers\n")
    print("| runner | outcome | ms / program | overhead vs `python -c pass` | vs old runner | programs/s |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['name']} | {row['outcome']} | {row['median_ms']:.1f} | {row['median_ms'] - floor:+.1f} ms | "
              f"{row['median_ms'] - old:+.1f} ms | {row['rate']:.1f} |")
    print()
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
