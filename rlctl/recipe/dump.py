"""Printing recipes: the fully resolved recipe as plain data, and a minimal TOML writer for it."""

from __future__ import annotations

import dataclasses
from typing import Any

from rlctl.recipe.schema import COMPONENT_SECTIONS, STAGE_TRAIN_KEYS, Recipe


def resolved_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain data (what ``rlctl validate`` prints)."""
    out: dict[str, Any] = {
        "model": _drop_none(dataclasses.asdict(recipe.model)),
        "data": recipe.data,
        "train": dataclasses.asdict(recipe.train),
        "eval": dataclasses.asdict(recipe.eval),
    }
    stage_dicts = []
    for stage in recipe.stages:
        sd: dict[str, Any] = {"name": stage.name, "steps": stage.steps}
        if stage.data is not None:
            sd["data"] = stage.data
        changed = {k: getattr(stage.train, k) for k in STAGE_TRAIN_KEYS
                   if getattr(stage.train, k) != getattr(recipe.train, k)}
        if changed:
            sd["train"] = changed
        for kind in COMPONENT_SECTIONS:
            spec = stage.components[kind]
            if kind == "reward":
                sd[kind] = [{"use": s.use, "name": s.name, "weight": s.weight, **s.options} for s in spec]
            elif spec is not None:
                sd[kind] = {"use": spec.use, **spec.options}
        stage_dicts.append(sd)
    if len(stage_dicts) == 1 and recipe.stages[0].name == "main":
        only = stage_dicts[0]
        out.update({k: v for k, v in only.items() if k in COMPONENT_SECTIONS and v != []})
    else:
        out["stage"] = stage_dicts
    return out


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def dumps_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for resolved recipes (tables, arrays of tables, scalars, arrays)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {scalar(x)}" for k, x in v.items()) + " }"
        raise TypeError(f"cannot write {v!r} as TOML")

    def is_table_array(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def table(prefix: str, d: dict[str, Any], header: str) -> None:
        if header:
            lines.append("")
            lines.append(header)
        for k, v in d.items():
            if not isinstance(v, dict) and not is_table_array(v) and v is not None:
                lines.append(f"{k} = {scalar(v)}")
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                table(name, v, f"[{name}]")
            elif is_table_array(v):
                for item in v:
                    table(name, item, f"[[{name}]]")

    table("", data, "")
    return "\n".join(lines).lstrip("\n") + "\n"
