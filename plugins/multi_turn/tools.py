"""Built-in tools: ``calculator`` (a safe arithmetic evaluator: no ``eval``) and ``python`` (programs run
in the kernel sandbox of ``rlctl_plugins.sandbox``, never in the trainer's process)."""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable

from rlctl.environments import Tool

# ------------------------------------------------------------------------------------- calculator
MAX_EXPRESSION_CHARS = 200
MAX_NODES = 100
MAX_DIGITS = 100  # integer results (and intermediate values) have at most this many digits
MAX_EXPONENT = 1000

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
    pass


def calculate(expression: str) -> str:
    """The value of an arithmetic expression: numbers, + - * / // % ** and parentheses.

    The expression is parsed into Python's syntax tree and only those nodes are evaluated, so names,
    calls, attributes and every other construct are refused; its length, its number of nodes and the
    size of every intermediate value are bounded, so that no expression can take long or use much memory
    (``9**9**9**9`` is refused before it is computed).
    """
    if not isinstance(expression, str):
        raise CalculatorError("expression must be a string")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError) as exc:
        raise CalculatorError(f"not an arithmetic expression: {getattr(exc, 'msg', exc)}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalculatorError(f"expression has more than {MAX_NODES} parts")
    value = _evaluate(tree.body)
    return _format(value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result too large") from None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise CalculatorError("^ is not a power here: write ** (e.g. 2 ** 10)")
    raise CalculatorError(f"unsupported: {type(node).__name__} (only numbers, + - * / // % ** and parentheses)")


def _check_power(base: int | float, exponent: int | float) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent larger than {MAX_EXPONENT}")
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * math.log10(abs(base)) > MAX_DIGITS:
            raise CalculatorError("result too large")
    if isinstance(base, (int, float)) and base < 0 and isinstance(exponent, float) and not exponent.is_integer():
        raise CalculatorError("a negative number to a fractional power")


def _checked(value: Any) -> int | float:
    if isinstance(value, complex):
        raise CalculatorError("the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_DIGITS * 3.33:
        raise CalculatorError("result too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result too large")
    return value


def _format(value: int | float) -> str:
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


def calculator_tool(timeout: float | None = None) -> Tool:
    return Tool(name="calculator", description="Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
                parameters={"type": "object", "properties": {"expression": {"type": "string"}},
                            "required": ["expression"]},
                call=calculate, timeout=timeout)


# ----------------------------------------------------------------------------------------- python
class PythonRunner:
    """Runs a program in the kernel sandbox and returns what it printed (and the exception that ended
    it, if one did). The sandbox is opened on first use and shared by the trajectories of a run."""

    _shared: dict[tuple, Any] = {}

    def __init__(self, timeout: float = 5.0, memory_mb: int = 512, sandbox: str = "auto"):
        self.timeout, self.memory_mb, self.mode = timeout, memory_mb, sandbox

    def sandbox(self) -> Any:
        from rlctl_plugins import sandbox as sb

        key = (self.timeout, self.memory_mb, self.mode)
        if key not in self._shared:
            limits = sb.Limits(timeout=self.timeout, memory_mb=self.memory_mb, max_file_mb=4, disk_mb=16,
                               max_processes=8)
            sb.make_non_dumpable()  # nothing else of this uid may read the trainer's memory
            try:
                self._shared[key] = sb.open_sandbox(self.mode, limits)
            except ValueError as exc:
                raise ValueError(f"tool 'python': {exc}") from None
        return self._shared[key]

    def __call__(self, code: str) -> str:
        if not isinstance(code, str):
            raise ValueError("code must be a string")
        result = self.sandbox().run({"style": "stdio", "code": code, "inputs": [""]})
        if result.timed_out:
            raise TimeoutError(f"the program ran longer than {self.timeout:g} s and was killed")
        if not result.started:
            raise RuntimeError("the sandbox did not start the program")
        return _program_output(result.report[2:])


def _program_output(report: bytes) -> str:
    """What one stdio case printed, from the harness's "exit signal exception truncated length" line."""
    end = report.find(b"\n")
    fields = report[:end].split() if end >= 0 else []
    if len(fields) != 5:
        return "error: the program was killed (a resource limit)"
    exit_code, sig, exc, truncated, size = (int(fields[0]), int(fields[1]), fields[2].decode("ascii", "replace"),
                                            int(fields[3]), int(fields[4]))
    output = report[end + 1:end + 1 + size].decode("utf-8", "replace")
    if truncated:
        output += "\n(output truncated)"
    if sig:
        return output + f"\nerror: the program was killed by signal {sig}"
    if exc != "-":
        return output + f"\nerror: {exc}"
    if exit_code:
        return output + f"\nerror: exit status {exit_code}"
    return output


def python_tool(timeout: float = 5.0, memory_mb: int = 512, sandbox: str = "auto") -> Tool:
    runner = PythonRunner(timeout, memory_mb, sandbox)
    return Tool(name="python", description="Run a Python program in a sandbox and return what it prints.",
                parameters={"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
                # the sandbox kills the program at `timeout`; the caller waits a little longer than that
                call=runner, timeout=timeout + 5.0)


BUILT_IN_TOOLS = {"calculator": calculator_tool, "python": python_tool}
