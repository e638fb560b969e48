"""Tool calls in a turn's text, and running them so that every failure becomes an observation.

Format: ``<tool_call>{"name": "calculator", "arguments": {"expression": "12 * 34"}}</tool_call>`` (the
Hermes / Qwen2.5 format, which chat templates with tool support also produce). Whatever goes wrong (not
JSON, an unknown tool, bad arguments, the tool raises or runs past its time) is reported to the policy as
the call's result, ``error: ...``, and counted by kind; the trajectory continues.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from rlctl.environments import Tool

CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
UNCLOSED = re.compile(r"<tool_call>(?!.*</tool_call>)", re.DOTALL)
ERROR_KINDS = ("invalid_json", "unknown_tool", "bad_arguments", "raised", "timeout")
MAX_RESULT_CHARS = 2000  # longer results are cut (an observation should not fill the context)


@dataclass
class Call:
    name: str | None
    arguments: dict[str, Any] | None
    error: str | None = None  # a parse error: the call cannot run
    kind: str | None = None  # its error kind (one of ERROR_KINDS)


@dataclass
class Result:
    name: str | None
    text: str  # what the policy is shown
    error: str | None  # error kind, or None
    seconds: float


def parse_calls(text: str) -> list[Call]:
    """Every ``<tool_call>`` of a turn (an unclosed one counts as a call with invalid JSON)."""
    calls = []
    for body in CALL.findall(text):
        try:
            value = json.loads(body)
        except ValueError as exc:
            calls.append(Call(None, None, f"the tool call is not valid JSON ({exc.msg} at character {exc.pos})",
                              "invalid_json"))
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            calls.append(Call(None, None, 'the tool call must be a JSON object {"name": ..., "arguments": {...}}',
                              "invalid_json"))
            continue
        arguments = value.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments object as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        if not isinstance(arguments, dict):
            calls.append(Call(value["name"], None, "the arguments must be a JSON object", "bad_arguments"))
            continue
        calls.append(Call(value["name"], arguments))
    if UNCLOSED.search(CALL.sub("", text)):
        calls.append(Call(None, None, "the tool call has no closing </tool_call>", "invalid_json"))
    return calls


def run_call(call: Call, tools: dict[str, Tool], default_timeout: float) -> Result:
    """Run one call; every failure is a result that says what went wrong."""
    if call.error is not None:
        return Result(call.name, f"error: {call.error}", call.kind, 0.0)
    tool = tools.get(call.name or "")
    if tool is None:
        known = ", ".join(sorted(tools)) or "none"
        return Result(call.name, f"error: unknown tool {call.name!r}; available: {known}", "unknown_tool", 0.0)
    timeout = tool.timeout if tool.timeout is not None else default_timeout
    start = time.perf_counter()
    outcome = _call_with_timeout(tool, call.arguments or {}, timeout)
    seconds = time.perf_counter() - start
    if isinstance(outcome, _Timeout):
        return Result(tool.name, f"error: {tool.name} did not finish within {timeout:g} s", "timeout", seconds)
    if isinstance(outcome, TypeError) and _is_signature_error(outcome):
        return Result(tool.name, f"error: bad arguments for {tool.name}: {outcome}", "bad_arguments", seconds)
    if isinstance(outcome, BaseException):
        return Result(tool.name, f"error: {tool.name} failed: {type(outcome).__name__}: {outcome}", "raised",
                      seconds)
    text = str(outcome)
    if len(text) > MAX_RESULT_CHARS:
        text = text[:MAX_RESULT_CHARS] + f"... ({len(text) - MAX_RESULT_CHARS} more characters)"
    return Result(tool.name, text, None, seconds)


class _Timeout:
    pass


def _call_with_timeout(tool: Tool, arguments: dict[str, Any], timeout: float) -> Any:
    """The tool's return value or exception; ``_Timeout()`` when it runs past ``timeout``.

    The call runs in a daemon thread: a tool written in Python cannot be stopped from outside, so one that
    never returns keeps its thread (it cannot block the run). Tools that run programs (``python``) are
    killed by their own sandbox timeout instead.
    """
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(tool.call(**arguments))
        except BaseException as exc:  # noqa: BLE001 - reported to the policy
            box.append(exc)

    worker = threading.Thread(target=target, daemon=True, name=f"rlctl-tool-{tool.name}")
    worker.start()
    worker.join(timeout)
    return box[0] if box else _Timeout()


def _is_signature_error(exc: TypeError) -> bool:
    text = str(exc)
    return "argument" in text and ("unexpected keyword" in text or "missing" in text or "positional" in text)


def results_text(results: Sequence[Result]) -> str:
    """The observation for a turn's calls: each result on its own line (named when there are several)."""
    if len(results) == 1:
        return results[0].text
    return "\n".join(f"{r.name or 'call'} {i + 1}: {r.text}" for i, r in enumerate(results))
