"""Building a stage's components: resolve each ``use`` name, check its options, build it, check requirements."""

from __future__ import annotations

from typing import Any

from rlctl.errors import PluginError
from rlctl.recipe.schema import COMPONENT_SECTIONS, ComponentSpec, Stage
from rlctl.signature import check_call


def check_stage_components(stage: Stage, problems: list[str]) -> dict[str, Any]:
    """Resolve every component name, check its options against the factory, and build it.

    Returns kind -> component (a list for rewards) for the components that could be built.
    """
    from rlctl import components as protocols

    built: dict[str, Any] = {"reward": []}
    for kind in COMPONENT_SECTIONS:
        specs = stage.components[kind]
        for spec in specs if isinstance(specs, list) else [specs]:
            if spec is None:
                continue
            comp = build_component(kind, spec, problems)
            if comp is None:
                continue
            protocol = protocols.PROTOCOLS[kind]
            if not isinstance(comp, protocol):
                problems.append(f"[{spec.section}] use = {spec.use!r}: the plugin's component lacks the "
                                f"{kind} method ({', '.join(_protocol_methods(protocol))})")
            unknown = set(protocols.requirements(comp)) - protocols.KNOWN_REQUIREMENTS
            if unknown:
                problems.append(f"[{spec.section}] use = {spec.use!r}: requires unknown data "
                                f"{sorted(unknown)}; known: {', '.join(sorted(protocols.KNOWN_REQUIREMENTS))}")
            if kind == "reward":
                built["reward"].append(comp)
            else:
                built[kind] = comp
    _check_requirements(stage, built, problems)
    return built


def _protocol_methods(protocol: type) -> list[str]:
    return [n for n in ("sample", "score", "compute", "step") if hasattr(protocol, n)]


def _check_requirements(stage: Stage, built: dict[str, Any], problems: list[str]) -> None:
    """Requirements must be satisfiable: advantages need an [advantage], rewards need a [[reward]]."""
    from rlctl.components import stage_needs

    label = "recipe" if stage.name == "main" else f"stage {stage.name!r}"
    needs = stage_needs(built)
    loss = stage.components["loss"].use if stage.components["loss"] else ""
    if "advantages" in needs and stage.components["advantage"] is None:
        problems.append(f"{label}: [loss] use = {loss!r} needs advantages, but there is no "
                        "[advantage] section (e.g. use = \"grpo\")")
    if "rewards" in needs and not stage.components["reward"]:
        problems.append(f"{label}: the components need rewards, but there is no [[reward]] table "
                        "(e.g. use = \"exact\")")
    sampler = stage.components["sampler"]
    provided = set(getattr(built.get("sampler"), "provides", ()) or ())
    if stage.train.max_staleness > 0:  # the rollout worker records them for any sampler (async_source.py)
        provided.add("behavior_logprobs")
    if "behavior_logprobs" in needs and "behavior_logprobs" not in provided and sampler is not None:
        problems.append(f"{label}: a component needs behaviour log-probs, but [sampler] use = "
                        f"{sampler.use!r} does not record them (its `provides` lacks 'behavior_logprobs')")
    advantage = built.get("advantage")
    minimum = getattr(advantage, "min_group_size", 1)
    if "advantages" in needs and stage.train.group_size < minimum:
        problems.append(f"{label}: [train] group_size = {stage.train.group_size}: advantage "
                        f"{stage.components['advantage'].use!r} compares completions within a group and "
                        f"needs group_size >= {minimum}")


def build_component(kind: str, spec: ComponentSpec, problems: list[str]) -> Any | None:
    """Build the component a recipe table names; on failure append one line to ``problems``."""
    from rlctl import plugins

    try:
        component = plugins.registry().get(kind, spec.use)
    except PluginError as exc:
        problems.append(f"[{spec.section}] use = {spec.use!r}: {exc}")
        return None
    before = len(problems)
    kwargs = check_call(component.factory, spec.options, spec.section, problems)
    if len(problems) > before:
        return None
    try:
        instance = component.factory(**kwargs)
    except (ValueError, TypeError) as exc:
        problems.append(f"[{spec.section}] (use = {spec.use!r}): {exc}")
        return None
    except Exception as exc:  # a plugin bug: name the plugin
        problems.append(f"[{spec.section}] use = {spec.use!r} (plugin {component.plugin}) failed to "
                        f"build: {type(exc).__name__}: {exc}")
        return None
    return instance
