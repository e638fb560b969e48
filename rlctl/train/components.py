"""Calling a stage's components: errors that name the plugin and recipe section, and their states."""

from __future__ import annotations

from typing import Any, Callable

from rlctl import plugins
from rlctl.errors import ComponentError, RecipeError, RlctlError
from rlctl.recipe import ComponentSpec, Stage, check_stage_components


def guarded(spec: ComponentSpec, kind: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a component method; an exception is re-raised naming plugin, kind and recipe section."""
    try:
        return fn(*args, **kwargs)
    except RlctlError:
        raise
    except Exception as exc:
        raise ComponentError(f"{kind} {spec.use!r} (plugin {plugin_of(kind, spec)}, recipe section "
                             f"[{spec.section}]) raised {type(exc).__name__}: {exc}") from exc


def plugin_of(kind: str, spec: ComponentSpec) -> str:
    try:
        return plugins.registry().get(kind, spec.use).plugin
    except Exception:  # pragma: no cover - the component was built from the registry
        return "?"


def build(stage: Stage, source: str) -> dict[str, Any]:
    """A stage's components, kind -> component (a list for rewards)."""
    problems: list[str] = []
    built = check_stage_components(stage, problems)
    if problems:
        raise RecipeError(problems, source=source)
    return built


def by_key(built: dict[str, Any]) -> dict[str, Any]:
    """Components under stable keys: ``sampler``, ``reward[0]``, ``reward[1]`` ..."""
    out = {}
    for kind, value in built.items():
        if isinstance(value, list):
            out.update({f"{kind}[{i}]": v for i, v in enumerate(value)})
        elif value is not None:
            out[kind] = value
    return out


def states(built: dict[str, Any]) -> dict[str, Any]:
    """state_dict() of every component that has one (e.g. prompt statistics of a sampler)."""
    return {key: c.state_dict() for key, c in by_key(built).items() if hasattr(c, "state_dict")}


def load_states(built: dict[str, Any], saved: dict[str, Any]) -> None:
    for key, component in by_key(built).items():
        if saved.get(key) is not None and hasattr(component, "load_state_dict"):
            component.load_state_dict(saved[key])


def close_components(built: dict[str, Any]) -> None:
    """Release what components hold outside Python's memory (engines, servers): their ``close()``, if any."""
    for component in built.values():
        for c in component if isinstance(component, list) else [component]:
            close = getattr(c, "close", None)
            if callable(close):
                close()
