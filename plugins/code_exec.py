"""Code-execution reward: run generated Python against tests in a kernel sandbox.

Every program runs in its own sandbox (``rlctl_plugins.sandbox``): new user, pid, network, mount and
IPC namespaces, a read-only root holding only the Python runtime, a private tmpfs, an empty
environment, no network, seccomp, resource limits and, where the machine allows, a cgroup. The
verdict is computed in the trainer, from what the sandbox reports:

* **stdin/stdout tests** (``{"inputs": [...], "outputs": [...]}``): the program runs as ``__main__``
  once per input, with the input on standard input; the sandbox returns what it printed and the
  trainer compares it with the expected output, which never enters the sandbox.
* **call tests** (``{"fn_name": ..., "inputs": [[args], ...], "outputs": [...]}``): the program is
  loaded once and the function called with each argument list; the sandbox returns the JSON of each
  returned value (or the type of the exception raised) and the trainer compares.
* **assert tests** (a string or list of statements, e.g. HumanEval's ``check(candidate)``): the tests
  run inside the sandbox, in the program's process, so a program can in principle forge their
  result. The known forgeries are blocked or detected (see ``docs/rewards.md``): leaving before the
  tests (no verdict: ``crashes``/``errors``), printing a pass marker (the verdict travels on a separate
  channel as one of several per-outcome random tokens the program cannot read), patching builtins,
  the standard library or ``sys`` hooks (``tampered``), shadowing builtins in the tests' namespace
  (the tests get a namespace without them), and reading the tests, tokens or expected values through
  frames, ``gc``, trace and audit hooks, signal handlers, ``ctypes`` or ``/proc/self/mem`` (refused).
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from rlctl.hookspecs import hookimpl
from rlctl.rollouts import Rollouts
from rlctl_plugins import sandbox as sb

# Outcomes of one sample; only "passed" scores 1.
OUTCOMES = ("passed", "failed", "errors", "timeouts", "crashes", "tampered", "no_tests")
_TOKEN_OUTCOMES = ("passed", "failed", "errors", "crashes", "tampered")

_CODE_BLOCK = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str:
    """The last fenced ```python (or ```py / unlabelled) block of ``text``; the whole text if none."""
    blocks = _CODE_BLOCK.findall(text)
    python = [body for lang, body in blocks if lang]
    chosen = python or [body for _, body in blocks]
    return chosen[-1] if chosen else text


def program_tests(info: dict[str, Any], tests_key: str) -> str | None:
    """Assert-style test code from ``info[tests_key]``: a string, or a list of statements joined by
    newlines (None when absent, empty, or input/output tests).

    A HumanEval-style ``def check(candidate)`` with ``info["entry_point"]`` gets ``check(entry_point)``
    appended.
    """
    tests = info.get(tests_key)
    if tests is None or isinstance(tests, dict) or _json_io(tests) is not None:
        return None
    if isinstance(tests, list) and tests and all(isinstance(t, dict) for t in tests):
        return None
    source = tests if isinstance(tests, str) else "\n".join(str(t) for t in tests)
    entry = info.get("entry_point")
    if entry and "def check(" in source:
        source += f"\n\ncheck({entry})\n"
    return source if source.strip() else None


@dataclass
class Suite:
    """One sample's tests: ``style`` is "assert" (``source``), "stdio" or "call" (``inputs``/``outputs``)."""

    style: str
    source: str = ""
    inputs: list[Any] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    fn_name: str | None = None


def _json_io(tests: Any) -> dict | None:
    if isinstance(tests, str) and tests.lstrip().startswith("{"):
        try:
            value = json.loads(tests)
        except ValueError:
            return None
        if isinstance(value, dict) and "inputs" in value and "outputs" in value:
            return value
    return None


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "".join(v if v.endswith("\n") else v + "\n" for v in value)
    raise ValueError(f"stdin/stdout tests need strings (or lists of lines), got {type(value).__name__}")


def parse_tests(info: dict[str, Any], tests_key: str) -> Suite | None:
    """The tests of one sample (None when there are none). Accepted forms of ``info[tests_key]``:

    * assert code: a string, or a list of statements (see ``program_tests``);
    * ``{"inputs": [...], "outputs": [...]}`` (or that object as a JSON string): stdin/stdout tests,
      or call tests when it (or ``info``) has ``"fn_name"``: each input is then a list of arguments;
    * ``[{"input": ..., "output": ...}, ...]``: stdin/stdout tests.
    """
    tests = info.get(tests_key)
    if tests is None:
        return None
    tests = _json_io(tests) or tests
    if isinstance(tests, list) and tests and all(isinstance(t, dict) for t in tests):
        try:
            tests = {"inputs": [t["input"] for t in tests], "outputs": [t["output"] for t in tests]}
        except KeyError as exc:
            raise ValueError(f"info[{tests_key!r}]: every test needs 'input' and 'output' (missing {exc})") from None
    if isinstance(tests, dict):
        inputs, outputs = tests.get("inputs"), tests.get("outputs")
        if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
            raise ValueError(f"info[{tests_key!r}]: 'inputs' and 'outputs' must be lists of the same length")
        if not inputs:
            return None
        fn_name = tests.get("fn_name") or info.get("fn_name")
        if fn_name:
            args = [list(a) if isinstance(a, (list, tuple)) else [a] for a in inputs]
            # plain JSON types on both sides: tuples become lists, as they do on the way back
            return Suite("call", inputs=json.loads(json.dumps(args)), outputs=json.loads(json.dumps(outputs)),
                         fn_name=str(fn_name))
        return Suite("stdio", inputs=[_text(i) for i in inputs], outputs=[_text(o) for o in outputs])
    source = program_tests(info, tests_key)
    return None if source is None else Suite("assert", source=source)


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().splitlines()]


def same_output(got: str, expected: str) -> bool:
    """Outputs match line by line, ignoring trailing whitespace on each line and at the end."""
    return _lines(got) == _lines(expected)


class CodeExecReward:
    """1.0 when the generated program passes every test, else 0.0.

    The program is the last ```python block of the completion (``extract = true``) or the whole
    completion; the tests are ``info[tests_key]``: assert statements (a string or a list), or
    stdin/stdout or function-call cases (see ``parse_tests``). Each program runs in a kernel sandbox
    (``sandbox = "auto"``: bubblewrap, else the built-in ``unshare`` sandbox; ``"none"`` runs without
    isolation and says so on every construction) limited to ``timeout`` wall-clock seconds,
    ``memory_mb`` of address space per process (and of memory in all, with a cgroup), ``max_file_mb``
    per written file and of output, ``disk_mb`` of private /tmp and ``max_processes`` processes and
    threads; ``workers`` programs run in parallel. ``allow_ctypes_import`` lets ``import ctypes``
    succeed in assert-style tests (numpy needs it; everything else of ctypes is refused there).

    After every ``score`` call, ``last_stats`` counts the samples per outcome: passed, failed (an
    assertion failed or an output differs), errors (the program raised, e.g. a syntax error, or exited
    with a non-zero status), timeouts, crashes (killed by a signal or a resource limit, MemoryError
    included, or ended without a verdict), tampered (assert-style tests: the program changed builtins,
    the standard library or interpreter hooks) and no_tests. ``totals`` accumulates them.
    """

    def __init__(self, timeout: float = 5.0, memory_mb: int = 1024, max_file_mb: int = 16,
                 workers: int | None = None, tests_key: str = "tests", extract: bool = True,
                 allow_ctypes_import: bool = True, sandbox: str = "auto", max_processes: int = 16,
                 disk_mb: int = 64, cgroup: bool = True):
        if timeout <= 0:
            raise ValueError(f"timeout = {timeout}: accepted values are > 0 seconds")
        if memory_mb < 64:
            raise ValueError(f"memory_mb = {memory_mb}: accepted values are >= 64 (the interpreter "
                             "itself needs some address space)")
        if max_file_mb < 1:
            raise ValueError(f"max_file_mb = {max_file_mb}: accepted values are >= 1")
        if disk_mb < 1:
            raise ValueError(f"disk_mb = {disk_mb}: accepted values are >= 1")
        if max_processes < 1:
            raise ValueError(f"max_processes = {max_processes}: accepted values are >= 1")
        if workers is not None and workers < 1:
            raise ValueError(f"workers = {workers}: accepted values are >= 1 (or unset: min(8, CPUs))")
        if sandbox not in sb.MODES:
            raise ValueError(f"sandbox = {sandbox!r}: accepted values are "
                             + ", ".join(f'"{m}"' for m in sb.MODES))
        self.timeout = float(timeout)
        self.memory_mb = memory_mb
        self.max_file_mb = max_file_mb
        self.workers = workers if workers is not None else min(8, os.cpu_count() or 1)
        self.tests_key = tests_key
        self.extract = extract
        self.allow_ctypes_import = allow_ctypes_import
        self.limits = sb.Limits(timeout=self.timeout, memory_mb=memory_mb, max_file_mb=max_file_mb,
                                disk_mb=disk_mb, max_processes=max_processes)
        # Nothing else running as this uid may read or write the trainer's memory.
        sb.make_non_dumpable()
        self.sandbox = sb.open_sandbox(sandbox, self.limits, use_cgroup=cgroup)
        self.isolation = self.sandbox.describe()
        self._signal_filter = sb.signal_handler_filter() or b""
        if not self.sandbox.isolated:
            print('rlctl: warning: [[reward]] use = "code_exec" with sandbox = "none": generated programs '
                  "run WITHOUT isolation, as the trainer's user, with its file system and network",
                  file=sys.stderr, flush=True)
        self.last_stats: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.totals: dict[str, int] = dict.fromkeys(OUTCOMES, 0)

    # ------------------------------------------------------------------ one program
    def run(self, code: str, tests: Suite | str) -> str:
        """Run one program against its tests; returns its outcome (one of ``OUTCOMES``)."""
        if isinstance(tests, str):
            tests = Suite("assert", source=tests)
        if tests.style == "assert":
            tokens = {k: secrets.token_hex(16).encode() for k in _TOKEN_OUTCOMES}
            job = {"style": "assert", "code": code, "tests": tests.source, "tokens": tokens,
                   "signal_filter": self._signal_filter, "allow_ctypes_import": self.allow_ctypes_import}
        elif tests.style == "stdio":
            job = {"style": "stdio", "code": code, "inputs": list(tests.inputs)}
        elif tests.style == "call":
            job = {"style": "call", "code": code, "inputs": list(tests.inputs), "fn_name": tests.fn_name}
        else:
            raise ValueError(f"unknown test style {tests.style!r}")
        result = self.sandbox.run(job)
        if result.timed_out:
            return "timeouts"
        if not result.started:
            detail = result.diagnostics.decode("utf-8", "replace").strip()
            raise sb.SandboxError(f"code_exec: the sandbox ({self.sandbox.backend}) did not start the "
                                  f"program (exit status {result.returncode}): {detail[-500:] or 'no output'}")
        report = result.report[2:]
        if report.startswith(b"E "):  # the program did not compile (or, call tests, load)
            return _exception_outcome(report[2:].split(b"\n", 1)[0].decode("ascii", "replace"))
        if tests.style == "assert":
            return _assert_verdict(report, tokens)
        if tests.style == "stdio":
            return _stdio_verdict(report, tests.outputs)
        return _call_verdict(report, tests.outputs)

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        jobs = []
        for text, info in zip(rollouts.completions, rollouts.info):
            jobs.append((extract_code(text) if self.extract else text, parse_tests(info, self.tests_key)))

        def one(job: tuple[str, Suite | None]) -> str:
            code, tests = job
            return "no_tests" if tests is None else self.run(code, tests)

        with ThreadPoolExecutor(max_workers=min(self.workers, max(1, len(jobs)))) as pool:
            outcomes = list(pool.map(one, jobs))
        self.last_stats = {k: outcomes.count(k) for k in OUTCOMES}
        for k, v in self.last_stats.items():
            self.totals[k] += v
        return torch.tensor([float(o == "passed") for o in outcomes], dtype=torch.float32)


def _exception_outcome(name: str) -> str:
    return "crashes" if name == "MemoryError" else "errors"


def _assert_verdict(report: bytes, tokens: dict[str, bytes]) -> str:
    found = [k for k, token in tokens.items() if token in report]
    if not found:
        return "crashes"  # ended without a verdict: killed, or left before the tests finished
    # Several processes (a program that forked) may report: any non-passing verdict wins.
    return next((k for k in _TOKEN_OUTCOMES[1:] if k in found), "passed")


def _stdio_verdict(report: bytes, outputs: list[str]) -> str:
    pos = 0
    for expected in outputs:
        end = report.find(b"\n", pos)
        fields = report[pos:end].split() if end >= 0 else []
        if len(fields) != 5:
            return "crashes"  # the harness stopped before this case: killed (e.g. by the memory cgroup)
        try:
            exit_code, sig, truncated, size = int(fields[0]), int(fields[1]), int(fields[3]), int(fields[4])
        except ValueError:
            return "crashes"
        exc = fields[2].decode("ascii", "replace")
        output = report[end + 1:end + 1 + size]
        pos = end + 1 + size
        if sig:
            return "crashes"
        if exc != "-" and exit_code != 0:
            return _exception_outcome(exc)
        if exit_code != 0:
            return "errors"
        if truncated or not same_output(output.decode("utf-8", "replace"), expected):
            return "failed"
    return "passed"


def _call_verdict(report: bytes, outputs: list[Any]) -> str:
    line = next((l for l in reversed(report.split(b"\n")) if l.startswith(b"C ")), None)
    try:
        results = json.loads(line[2:]) if line is not None else None
    except ValueError:
        results = None
    if not isinstance(results, list) or len(results) != len(outputs):
        return "crashes"
    for result, expected in zip(results, outputs):
        if not isinstance(result, dict):
            return "crashes"
        if "e" in result:
            return _exception_outcome(str(result["e"]))
        try:
            value = json.loads(result["v"]) if "v" in result else _UNSET
        except (ValueError, TypeError):
            value = _UNSET
        if value is _UNSET or not _equal(value, expected):
            return "failed"
    return "passed"


_UNSET = object()


def _equal(value: Any, expected: Any) -> bool:
    if isinstance(value, float) and isinstance(expected, float) and math.isnan(value) and math.isnan(expected):
        return True
    return type(value) in (int, float, str, bool, list, dict, type(None)) and value == expected


@hookimpl
def rlctl_register_rewards(register):
    register("code_exec", CodeExecReward)
