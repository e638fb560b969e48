"""The code_exec reward: correct programs pass; runaway and hostile programs are contained and score 0.

The attacks on the sandbox itself are in tests/test_sandbox.py."""

from __future__ import annotations

import time

import pytest
import torch
from torch.testing import assert_close

from rlctl import plugins
from rlctl.rollouts import Rollouts
from rlctl_plugins.code_exec import OUTCOMES, Suite, extract_code, parse_tests, program_tests, same_output

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
CORRECT = "def add(a, b):\n    return a + b\n"
TIMEOUT = 2.0


def make_rollouts(completions, infos) -> Rollouts:
    n = len(completions)
    return Rollouts(
        prompt_ids=torch.ones(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.ones(n, 1, dtype=torch.long),
        completion_mask=torch.ones(n, 1, dtype=torch.long),
        group_ids=torch.arange(n),
        prompts=[""] * n,
        completions=list(completions),
        info=list(infos),
    )


def code_exec(**options):
    return plugins.get("reward", "code_exec")(**options)


@pytest.fixture(scope="module")
def sandbox():
    return code_exec(timeout=TIMEOUT, memory_mb=256, workers=8)


def test_correct_solution_scores_one_and_wrong_scores_zero(sandbox):
    completions = [
        f"Here is my solution:\n```python\n{CORRECT}```\nDone.",
        CORRECT,  # no code block: the whole completion is the program
        "```python\ndef add(a, b):\n    return a - b\n```",
        "```python\ndef add(a, b) return\n```",
        "```python\ndef sub(a, b):\n    return a - b\n```",
    ]
    scores = sandbox.score(make_rollouts(completions, [{"tests": TESTS}] * len(completions)))
    assert scores.dtype == torch.float32
    assert_close(scores, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))
    assert sandbox.last_stats == {**dict.fromkeys(OUTCOMES, 0), "passed": 2, "failed": 1, "errors": 2}


def test_hostile_programs_are_contained_and_score_zero(sandbox, tmp_path):
    outside = tmp_path / "outside.txt"
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    hostile = {
        "infinite loop": "while True:\n    pass",
        "sleeping loop": "import time\nwhile True:\n    time.sleep(0.1)",
        "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))",
        "huge allocation": "x = bytearray(2**40)",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "socket connect": "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
        "dns lookup": "import socket\nsocket.getaddrinfo('example.com', 80)",
        "write outside": f"open({str(outside)!r}, 'w').write('pwned')",
        "delete outside": f"import os\nos.remove({str(existing)!r})",
        "exit before tests": "import os\nos._exit(0)",
        "sys.exit": "import sys\nsys.exit(0)",
        "ctypes": "import ctypes\nctypes.CDLL(None).system(b'true')",  # refused in assert-style tests
    }
    completions = [f"```python\n{code}\n{CORRECT}```" for code in hostile.values()]
    start = time.monotonic()
    scores = sandbox.score(make_rollouts(completions, [{"tests": TESTS}] * len(completions)))
    elapsed = time.monotonic() - start
    assert dict(zip(hostile, scores.tolist())) == dict.fromkeys(hostile, 0.0), sandbox.last_stats
    stats = sandbox.last_stats
    assert stats["timeouts"] == 2
    assert stats["crashes"] >= 3  # memory bomb, huge allocation, exit before tests
    assert stats["passed"] == 0 and sum(stats.values()) == len(hostile)
    assert elapsed < 4 * TIMEOUT  # the loops were killed at the wall-clock limit
    assert not outside.exists()
    assert existing.read_text() == "keep me"


def test_harmless_inside_the_sandbox_is_not_penalised(sandbox):
    """Processes, signals and failed network calls stay inside the sandbox: a correct program that
    makes them passes (nothing was blocked; the verdict says what happened)."""
    contained = {
        "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'], capture_output=True)",
        "os.system": "import os\nos.system('true')",
        "signal parent": "import os, signal\nos.kill(os.getppid(), signal.SIGTERM)",
        "handled network failure": "import socket\ntry:\n    socket.create_connection(('127.0.0.1', 9))\n"
                                   "except OSError:\n    pass",
    }
    scores = sandbox.score(make_rollouts([f"{code}\n{CORRECT}" for code in contained.values()],
                                         [{"tests": TESTS}] * len(contained)))
    assert dict(zip(contained, scores.tolist())) == dict.fromkeys(contained, 1.0), sandbox.last_stats


def test_sandbox_allows_local_work(sandbox, monkeypatch):
    monkeypatch.setenv("RLCTL_TEST_SECRET", "s3cret")
    code = (
        "import os, json, tempfile, threading, asyncio\n"
        "assert 'RLCTL_TEST_SECRET' not in os.environ\n"  # environment is stripped
        "os.mkdir('sub')\n"
        "with open('sub/data.json', 'w') as f:\n    json.dump([1, 2], f)\n"
        "with tempfile.NamedTemporaryFile('w', delete=False) as f:\n    f.write('x')\n"
        "async def three():\n    return 3\n"
        "def total():\n    return sum(json.load(open('sub/data.json'))) + asyncio.run(three())\n"
    )
    scores = sandbox.score(make_rollouts([code], [{"tests": "assert total() == 6"}]))
    assert scores.tolist() == [1.0], sandbox.last_stats


def test_tests_formats_and_missing_tests(sandbox):
    human_eval = {"tests": "def check(candidate):\n    assert candidate(1, 2) == 3\n", "entry_point": "add"}
    stdio = {"tests": {"inputs": ["1 2\n"], "outputs": ["3\n"]}}
    stdio_json = {"tests": '{"inputs": ["1 2\\n"], "outputs": ["3"]}'}
    stdio_pairs = {"tests": [{"input": "4 5\n", "output": "9\n"}]}
    call = {"tests": {"fn_name": "add", "inputs": [[1, 2]], "outputs": [3]}}
    read_sum = "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n" + CORRECT
    infos = [{"tests": ["assert add(1, 1) == 2", "assert add(0, 0) == 0"]}, human_eval, stdio, stdio_json,
             stdio_pairs, call, {}, {"tests": "  "}, {"tests": {"inputs": [], "outputs": []}}]
    scores = sandbox.score(make_rollouts([CORRECT, CORRECT, read_sum, read_sum, read_sum, CORRECT] + [CORRECT] * 3,
                                         infos))
    assert_close(scores, torch.tensor([1.0] * 6 + [0.0] * 3))
    assert sandbox.last_stats["no_tests"] == 3
    assert sandbox.totals["no_tests"] >= 3


def test_parse_tests_and_output_comparison():
    assert parse_tests({"tests": "assert x"}, "tests") == Suite("assert", source="assert x")
    call = parse_tests({"tests": {"inputs": [[1, [2]], 3], "outputs": [(1, 2), 4]}, "fn_name": "f"}, "tests")
    assert call == Suite("call", inputs=[[1, [2]], [3]], outputs=[[1, 2], 4], fn_name="f")
    assert parse_tests({"tests": {"inputs": [["a", "b"]], "outputs": ["c"]}}, "tests").inputs == ["a\nb\n"]
    with pytest.raises(ValueError, match="same length"):
        parse_tests({"tests": {"inputs": ["1"], "outputs": []}}, "tests")
    assert program_tests({"tests": {"inputs": ["1"], "outputs": ["1"]}}, "tests") is None
    assert same_output("1 2  \n3\n\n", "1 2\n3") and not same_output("1\n2", "1 2")


def test_extract_code():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```py\nx = 2\n```\n") == "x = 2\n"
    assert extract_code("```\ny = 1\n```") == "y = 1\n"
    assert extract_code("```python\nx = 1\n```\n```text\nout\n```") == "x = 1\n"
    assert extract_code("print(1)") == "print(1)"
    assert program_tests({"tests": ["a", "b"]}, "tests") == "a\nb"
    assert program_tests({"checks": "c"}, "checks") == "c"
    assert program_tests({}, "tests") is None


def test_extract_false_runs_the_whole_completion():
    r = code_exec(extract=False, timeout=TIMEOUT)
    scores = r.score(make_rollouts([f"```python\n{CORRECT}```"], [{"tests": TESTS}]))
    assert scores.tolist() == [0.0] and r.last_stats["errors"] == 1  # the fence is a syntax error


@pytest.mark.parametrize("options, message", [
    ({"timeout": 0}, "timeout = 0"),
    ({"memory_mb": 10}, "memory_mb = 10"),
    ({"max_file_mb": 0}, "max_file_mb = 0"),
    ({"workers": 0}, "workers = 0"),
    ({"disk_mb": 0}, "disk_mb = 0"),
    ({"max_processes": 0}, "max_processes = 0"),
    ({"sandbox": "docker"}, "sandbox = 'docker'"),
])
def test_validation(options, message):
    with pytest.raises(ValueError, match=message):
        code_exec(**options)
