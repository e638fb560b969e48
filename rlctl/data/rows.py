"""JSON Lines rows: reading and validating them, and turning them into prompts.

Rows are checked before and while they are parsed (regular file, UTF-8, nesting depth, one object per
line, valid Unicode); every problem names the file and the line (row) number.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from rlctl.errors import DataError
from rlctl.rollouts import Prompt

MAX_NESTING = 64  # objects and arrays within each other in one data row
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"?')  # an unterminated string runs to the end: linear time
_BRACKETS = re.compile(r"[^\[\]{}]+")
_SURROGATE = re.compile("[\ud800-\udfff]")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file; every problem names the file and the line (row) number."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"[data] file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"[data] {path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):  # checked before opening: a device or pipe would never end
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a device, pipe or socket)"
        raise DataError(f"[data] {path}: {kind}; accepted: a JSON Lines file")
    rows = []
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"[data] {path}:{number}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}); accepted: UTF-8 text") from None
            if not line.strip():
                continue
            if number == 1:
                line = line.removeprefix("\ufeff")
            depth = _nesting(line)
            if depth > MAX_NESTING:
                raise DataError(f"[data] {path}:{number}: nested {depth} levels deep; accepted: at most "
                                f"{MAX_NESTING} levels of objects and arrays")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"[data] {path}:{number}: invalid JSON ({exc.msg})") from None
            except RecursionError:
                raise DataError(f"[data] {path}:{number}: nested too deeply; accepted: at most {MAX_NESTING} "
                                "levels of objects and arrays") from None
            if not isinstance(row, dict):
                raise DataError(f"[data] {path}:{number}: expected a JSON object per line")
            if "\\u" in line and _has_surrogate(row):
                raise DataError(f"[data] {path}:{number}: invalid Unicode (a lone surrogate escape such as "
                                "\\ud800); accepted: text that is valid Unicode")
            rows.append({**row, "_row": number})
    return rows


def _nesting(line: str) -> int:
    """How deeply objects and arrays nest in one JSON text, from its brackets outside strings (no parse)."""
    brackets = _BRACKETS.sub("", _STRINGS.sub("", line)) if ("[" in line or "{" in line) else ""
    if len(brackets) <= MAX_NESTING:  # too few brackets to exceed the limit: no need to count
        return len(brackets)
    depth = deepest = 0
    for char in brackets:
        depth += 1 if char in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _has_surrogate(value: Any) -> bool:
    """True if a string (key or value) in ``value`` holds a lone UTF-16 surrogate (depth is bounded)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def rows_to_prompts(rows: list[dict[str, Any]], where: str, prompt_key: str, answer_key: str,
                     solution_key: str) -> list[Prompt]:
    prompts, problems = [], []
    for i, row in enumerate(rows):
        number = row.pop("_row", i + 1)
        text = row.get(prompt_key)
        if not isinstance(text, str) or not text.strip():
            found = "missing" if prompt_key not in row else "empty" if isinstance(text, str) else "not text"
            problems.append(f"row {number}: prompt key {prompt_key!r} is {found} (keys: {', '.join(row)})")
            continue
        answer = row.get(answer_key)
        solution = row.get(solution_key)
        info = {k: v for k, v in row.items() if k not in (prompt_key, answer_key, solution_key)}
        prompts.append(Prompt(text=text, answer=None if answer is None else str(answer),
                              solution=None if solution is None else str(solution), info=info))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(f"[data] {where}: {len(problems)} bad row(s): {shown}")
    return prompts


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with Path(path).open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
