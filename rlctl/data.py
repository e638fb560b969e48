"""Prompt sources (``[data] source = ...``) and the seeded prompt stream the trainer draws from.

Sources: ``arithmetic`` (built-in synthetic, verifiable), ``jsonl`` (local files) and ``hf``
(Hugging Face ``datasets``: a local directory/file or a cached hub name). Each returns train and
held-out eval prompts; the keys of ``[data]`` other than ``source`` are the source's options.
"""

from __future__ import annotations

import json
import os
import random
import re
import stat
from pathlib import Path
from typing import Any, Callable

from rlctl.errors import DataError
from rlctl.rollouts import Prompt
from rlctl.word_problems import word_problems

Split = tuple[list[Prompt], list[Prompt]]


def arithmetic(num_train: int = 2000, num_eval: int = 200, min_operand: int = 0, max_operand: int = 99,
               ops: list = ["+"], seed: int = 1234, pairs: bool = False) -> Split:  # noqa: B006 (read-only)
    """Problems ``a+b=`` with answer ``a+b``; eval problems never appear in training.

    ``pairs = true`` adds preference pairs: ``info["chosen"]`` is the answer, ``info["rejected"]`` a
    near miss (off by 1 or 10), for the ``pairs`` sampler and preference losses.
    """
    if min_operand > max_operand:
        raise ValueError(f"min_operand = {min_operand} > max_operand = {max_operand}")
    bad = [o for o in ops if o not in ("+", "-", "*")]
    if bad or not ops:
        raise ValueError(f"ops = {ops!r}: accepted operators are '+', '-', '*'")
    space = (max_operand - min_operand + 1) ** 2 * len(ops)
    if num_train + num_eval > space:
        raise ValueError(f"num_train + num_eval = {num_train + num_eval}: only {space} distinct problems exist")
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    prompts: list[Prompt] = []
    while len(prompts) < num_train + num_eval:
        a, b = rng.randint(min_operand, max_operand), rng.randint(min_operand, max_operand)
        op = rng.choice(ops)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        value = a + b if op == "+" else a - b if op == "-" else a * b
        info = {"chosen": str(value), "rejected": str(value + rng.choice((-10, -1, 1, 10)))} if pairs else {}
        prompts.append(Prompt(text=f"{a}{op}{b}=", answer=str(value), solution=str(value), info=info))
    return prompts[:num_train], prompts[num_train:]


def jsonl(path: str, eval_path: str = "", prompt_key: str = "prompt", answer_key: str = "answer",
          solution_key: str = "solution", eval_size: int = 0, seed: int = 0) -> Split:
    """Rows of a JSON Lines file; other keys of each row are kept in ``Prompt.info``."""
    rows = _read_jsonl(Path(path))
    train = _rows_to_prompts(rows, path, prompt_key, answer_key, solution_key)
    if eval_path:
        evals = _rows_to_prompts(_read_jsonl(Path(eval_path)), eval_path, prompt_key, answer_key, solution_key)
        return train, evals
    return _split(train, eval_size, seed)


def hf(dataset: str, split: str = "train", eval_split: str = "", config: str = "", data_files: str = "",
       prompt_key: str = "prompt", answer_key: str = "answer", solution_key: str = "solution",
       eval_size: int = 0, seed: int = 0) -> Split:
    """A Hugging Face ``datasets`` dataset (needs ``pip install rlctl[datasets]``)."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError("[data] source = 'hf' needs the datasets package: pip install 'rlctl[datasets]'") from exc
    kwargs: dict[str, Any] = {}
    if data_files:
        kwargs["data_files"] = data_files
    ds = datasets.load_dataset(dataset, config or None, **kwargs)
    if split not in ds:
        raise DataError(f"[data] split = {split!r}: dataset has splits {', '.join(ds)}")
    train = _rows_to_prompts(list(ds[split]), dataset, prompt_key, answer_key, solution_key)
    if eval_split:
        if eval_split not in ds:
            raise DataError(f"[data] eval_split = {eval_split!r}: dataset has splits {', '.join(ds)}")
        return train, _rows_to_prompts(list(ds[eval_split]), dataset, prompt_key, answer_key, solution_key)
    return _split(train, eval_size, seed)


SOURCES: dict[str, Callable[..., Split]] = {"arithmetic": arithmetic, "word_problems": word_problems,
                                          "jsonl": jsonl, "hf": hf}


def check_data_config(data: dict[str, Any], problems: list[str], section: str = "data") -> None:
    from rlctl.recipe import check_call

    source = data.get("source", "arithmetic")
    if source not in SOURCES:
        problems.append(f"[{section}] source = {source!r}: accepted values are {', '.join(SOURCES)}")
        return
    options = {k: v for k, v in data.items() if k != "source"}
    before = len(problems)
    check_call(SOURCES[source], options, section, problems)
    for key in ("path", "eval_path"):
        if options.get(key) and source == "jsonl" and not Path(options[key]).exists():
            problems.append(f"[{section}] {key} = {options[key]!r}: file not found")
    if len(problems) == before and source != "hf":  # local sources are cheap: check their rows too
        try:
            load_prompts(data)
        except DataError as exc:
            problems.append(str(exc).replace("[data]", f"[{section}]", 1))


def load_prompts(data: dict[str, Any]) -> Split:
    options = {k: v for k, v in data.items() if k != "source"}
    try:
        train, evals = SOURCES[data.get("source", "arithmetic")](**options)
    except ValueError as exc:
        raise DataError(f"[data] {str(exc).strip()}") from None
    if not train:
        raise DataError("[data]: the training split is empty")
    return train, evals


MAX_NESTING = 64  # objects and arrays within each other in one data row
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"?')  # an unterminated string runs to the end: linear time
_BRACKETS = re.compile(r"[^\[\]{}]+")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
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


def _rows_to_prompts(rows: list[dict[str, Any]], where: str, prompt_key: str, answer_key: str,
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


def _split(prompts: list[Prompt], eval_size: int, seed: int) -> Split:
    if eval_size <= 0:
        return prompts, []
    if eval_size >= len(prompts):
        raise DataError(f"[data] eval_size = {eval_size}: only {len(prompts)} rows")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    held = set(order[:eval_size])
    return ([p for i, p in enumerate(prompts) if i not in held],
            [p for i, p in enumerate(prompts) if i in held])


class PromptStream:
    """Epoch-wise shuffled prompts under a seed; ``position`` makes resuming exact."""

    def __init__(self, prompts: list[Prompt], seed: int):
        self.prompts = prompts
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Prompt]:
        batch = []
        while len(batch) < n:
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch)
            batch.append(self.prompts[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with Path(path).open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
