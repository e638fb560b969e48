"""Checking options against a factory's signature: keyword names, type hints, required options.

Shared by recipe validation (component and ``[model]`` tables) and the data sources (``[data]``): each
problem is appended as one line naming the key path, the bad value and what is accepted.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from typing import Any, Callable, Literal, get_args, get_origin


def check_call(factory: Callable[..., Any], options: dict[str, Any], section: str,
               problems: list[str]) -> dict[str, Any]:
    """Check recipe options against ``factory``'s keyword parameters; returns coerced kwargs."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        sig = inspect.signature(factory)
        hints = typing.get_type_hints(target)
    except (TypeError, ValueError, NameError):
        return dict(options)
    params = {n: p for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    kwargs = {}
    for key, value in options.items():
        if key not in params:
            if takes_any:
                kwargs[key] = value
                continue
            problems.append(unknown_key_message(f"{section}.{key}", key, list(params)))
            continue
        ok, converted, expected = coerce(value, hints.get(key, Any))
        if not ok:
            problems.append(f"[{section}] {key} = {value!r}: expected {expected}")
            continue
        kwargs[key] = converted
    missing = [n for n, p in params.items() if p.default is p.empty and n not in options]
    for name in missing:
        problems.append(f"[{section}] {name}: missing required option")
    return kwargs


def coerce(value: Any, annotation: Any) -> tuple[bool, Any, str]:
    """(ok, converted value, description of what is expected) for a TOML value vs a type hint."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True, value, "any value"
    origin = get_origin(annotation)
    if origin is Literal:
        choices = get_args(annotation)
        return value in choices, value, "one of " + ", ".join(repr(c) for c in choices)
    if origin in (typing.Union, types.UnionType):
        descriptions = []
        for arg in get_args(annotation):
            ok, converted, expected = coerce(value, arg)
            if ok:
                return True, converted, expected
            descriptions.append(expected)
        return False, value, " or ".join(descriptions)
    if annotation is type(None):
        return value is None, value, "nothing"
    base = origin or annotation
    if base is bool:
        return isinstance(value, bool), value, "true or false"
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value, "a number"
    if base is str:
        return isinstance(value, str), value, "a string"
    if base in (list, tuple, typing.Sequence):
        return isinstance(value, list), value, "an array"
    if base in (dict, typing.Mapping):
        return isinstance(value, dict), value, "a table"
    return True, value, getattr(annotation, "__name__", str(annotation))


def unknown_key_message(path: str, key: str, accepted: Any) -> str:
    accepted = list(accepted)
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    section, _, _ = path.rpartition(".")
    where = f"[{section}] {key}" if section else key
    listing = ", ".join(accepted) if accepted else "none (this takes no options)"
    return f"{where}: unknown key{hint} Accepted: {listing}"
