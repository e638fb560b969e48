"""Reading recipe files: TOML text with its includes merged underneath, within size, count and depth limits.

Every error names the file (and, for invalid UTF-8 or TOML, the line).
"""

from __future__ import annotations

import copy
import os
import stat
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from rlctl.errors import RecipeError

MAX_INCLUDE_BYTES = 1 << 20  # per recipe file
MAX_INCLUDE_FILES = 64  # files read for one recipe, the recipe itself and every include counted
MAX_INCLUDE_DEPTH = 16  # includes within includes
MAX_NESTING = 64  # tables and arrays within each other


def read_toml_with_includes(path: Path, _seen: tuple[Path, ...] = (), _count: list[int] | None = None
                            ) -> dict[str, Any]:
    """The recipe at ``path`` with its includes merged underneath (limits: see ``MAX_INCLUDE_*``)."""
    count = [0] if _count is None else _count
    count[0] += 1
    where = f"include = {path.name!r} in {_seen[-1]}: " if _seen else ""
    if count[0] > MAX_INCLUDE_FILES:
        raise RecipeError(f"{where}more than {MAX_INCLUDE_FILES} recipe files read through includes "
                          f"(every include counts, repeated ones too); accepted: at most {MAX_INCLUDE_FILES}")
    if len(_seen) > MAX_INCLUDE_DEPTH:
        raise RecipeError(f"{where}includes nested more than {MAX_INCLUDE_DEPTH} deep "
                          f"({' -> '.join(p.name for p in _seen)} -> ...); accepted: at most {MAX_INCLUDE_DEPTH}")
    path = path.resolve() if path.exists() else path
    if path in _seen:
        raise RecipeError(f"include cycle: {' -> '.join(str(p) for p in (*_seen, path))}")
    text = _read_recipe_file(path, where)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"invalid TOML: {exc}", source=str(path)) from None
    except RecursionError:
        raise RecipeError(f"invalid TOML: nested more than {MAX_NESTING} levels deep", source=str(path)) from None
    if nesting_depth(doc) > MAX_NESTING:
        raise RecipeError(f"tables and arrays nested more than {MAX_NESTING} levels deep; accepted: at most "
                          f"{MAX_NESTING}", source=str(path))
    includes = doc.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise RecipeError(f"include = {includes!r}: expected a path or a list of paths", source=str(path))
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = deep_merge(merged, read_toml_with_includes(path.parent / inc, (*_seen, path), count))
    return deep_merge(merged, doc)


def _read_recipe_file(path: Path, where: str = "") -> str:
    """The text of a recipe file: a regular file (checked before it is opened), <= 1 MiB, UTF-8."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise RecipeError(f"{where}recipe file not found: {path}") from None
    except OSError as exc:
        raise RecipeError(f"{where}recipe file {path}: cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise RecipeError(f"{where}recipe file {path}: is a directory; accepted: a .toml file")
    if not stat.S_ISREG(info.st_mode):
        raise RecipeError(f"{where}recipe file {path}: not a regular file (a device, pipe or socket); "
                          "accepted: a .toml file")
    if info.st_size > MAX_INCLUDE_BYTES:
        raise RecipeError(f"{where}recipe file {path}: {info.st_size} bytes; accepted: at most "
                          f"{MAX_INCLUDE_BYTES} bytes (1 MiB)")
    try:  # O_NONBLOCK: should the file have been swapped for a pipe meanwhile, opening it does not hang
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise RecipeError(f"{where}recipe file {path}: not a regular file; accepted: a .toml file")
            data = fh.read(MAX_INCLUDE_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"{where}recipe file {path}: cannot be read ({exc.strerror})") from None
    if len(data) > MAX_INCLUDE_BYTES:
        raise RecipeError(f"{where}recipe file {path}: larger than {MAX_INCLUDE_BYTES} bytes; accepted: at "
                          "most 1 MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(f"invalid UTF-8 at line {line} (byte 0x{data[exc.start]:02x}); accepted: UTF-8 text",
                          source=str(path)) from None


def nesting_depth(value: Any) -> int:
    """How deeply tables and arrays nest in ``value`` (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_NESTING:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; anything else (arrays included) in ``top`` replaces ``base``."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
