"""The ``[data]`` table: checking it against its source's options, and loading its prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlctl.data.sources import SOURCES, Split
from rlctl.errors import DataError
from rlctl.signature import check_call


def check_data_config(data: dict[str, Any], problems: list[str], section: str = "data") -> None:
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
