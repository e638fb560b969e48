"""The built-in ``tools`` environment: runs the tool calls of each turn and ends the episode at the
first turn without one (the policy's answer). It gives no reward itself: the recipe's rewards judge
the answer (the final turn) and may read the whole trajectory from ``info``."""

from __future__ import annotations

from rlctl.environments import Step, Tool, Turn

from .tool_calls import ERROR_KINDS, parse_calls, results_text, run_call
from .tools import BUILT_IN_TOOLS, calculator_tool, python_tool


class ToolEnvironment:
    """Offers ``tools`` (built-in names: ``calculator``, ``python``) and answers every call with its
    result, or with ``error: ...`` when the call is not JSON, names an unknown tool, has bad arguments,
    raises or runs past ``tool_timeout`` seconds (``python_timeout`` for programs, killed by the sandbox).
    At most ``max_calls_per_turn`` calls of a turn run; the others are answered as skipped."""

    def __init__(self, tools: list[str] = ["calculator"], tool_timeout: float = 5.0,  # noqa: B006
                 python_timeout: float = 5.0, python_memory_mb: int = 512, sandbox: str = "auto",
                 max_calls_per_turn: int = 4):
        unknown = [t for t in tools if t not in BUILT_IN_TOOLS]
        if unknown or not tools:
            raise ValueError(f"tools = {tools!r}: accepted tools are {', '.join(repr(t) for t in BUILT_IN_TOOLS)}")
        if tool_timeout <= 0 or python_timeout <= 0:
            raise ValueError("tool_timeout and python_timeout: accepted values are > 0 seconds")
        if max_calls_per_turn < 1:
            raise ValueError(f"max_calls_per_turn = {max_calls_per_turn}: accepted values are >= 1")
        made = {"calculator": lambda: calculator_tool(),
                "python": lambda: python_tool(python_timeout, python_memory_mb, sandbox)}
        self.tools: list[Tool] = [made[name]() for name in dict.fromkeys(tools)]
        self.by_name = {t.name: t for t in self.tools}
        self.tool_timeout = tool_timeout
        self.max_calls_per_turn = max_calls_per_turn

    def step(self, turn: Turn) -> Step:
        calls = parse_calls(turn.text)
        if not calls:
            return Step(done=True)
        results = [run_call(c, self.by_name, self.tool_timeout) for c in calls[:self.max_calls_per_turn]]
        text = results_text(results)
        if len(calls) > self.max_calls_per_turn:
            text += f"\n(skipped {len(calls) - self.max_calls_per_turn} more calls: at most " \
                    f"{self.max_calls_per_turn} per turn)"
        info: dict[str, float] = {"tool_calls": float(len(results)),
                                  "tool_errors": float(sum(r.error is not None for r in results)),
                                  "tool_time": sum(r.seconds for r in results)}
        for kind in ERROR_KINDS:
            count = sum(r.error == kind for r in results)
            if count:
                info[f"tool_error/{kind}"] = float(count)
        return Step(observation=text, info=info)
