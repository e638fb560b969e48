"""``--set`` overrides: ``section.key=value`` items applied to a recipe document before validation."""

from __future__ import annotations

from typing import Any

from rlctl.errors import RecipeError
from rlctl.recipe.files import tomllib


def parse_value(text: str) -> Any:
    """A TOML value (``0.3``, ``true``, ``"x"``, ``[1, 2]``); anything else is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return text


def apply_override(doc: dict[str, Any], item: str, source: str = "--set") -> None:
    """Apply ``section.key=value`` (array entries by index: ``reward.0.weight=0.5``)."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. loss.clip_high=0.28")
    key, text = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {item!r}: empty key")
    node: Any = doc
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"--set {key}: {where!r} needs an index below {len(node)}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise RecipeError(f"--set {key}: {where!r} is a value, not a table")
    if isinstance(node, list):
        raise RecipeError(f"--set {key}: cannot replace an array entry as a whole")
    node[parts[-1]] = parse_value(text.strip())
