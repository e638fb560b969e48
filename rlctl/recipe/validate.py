"""Validating a recipe document into a ``Recipe``: core sections, stages, component tables, semantics.

Everything is checked before any model loads, and every problem is reported at once, one line each,
naming the key path, the bad value and what is accepted. Heavy modules (models, LoRA, data sources,
plugins) are imported only when a check needs them.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from rlctl.errors import RecipeError, RlctlError
from rlctl.recipe.build import check_stage_components
from rlctl.recipe.schema import (
    COMPONENT_SECTIONS,
    STAGE_TRAIN_KEYS,
    TOP_LEVEL_KEYS,
    ComponentSpec,
    EvalConfig,
    ModelConfig,
    Recipe,
    Stage,
    TrainConfig,
)
from rlctl.signature import check_call, coerce, unknown_key_message


def parse_recipe(doc: dict[str, Any], source: str = "", check_components: bool = True) -> Recipe:
    problems: list[str] = []
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            problems.append(unknown_key_message(key, key, TOP_LEVEL_KEYS))

    model = to_dataclass(ModelConfig, doc.get("model", {}), "model", problems)
    train = to_dataclass(TrainConfig, doc.get("train", {}), "train", problems)
    evalc = to_dataclass(EvalConfig, doc.get("eval", {}), "eval", problems)
    data = doc.get("data", {"source": "arithmetic"})
    if not isinstance(data, dict):
        problems.append(f"[data]: expected a table, got {data!r}")
        data = {"source": "arithmetic"}
    if model is not None and not model.name and model.tiny is None and not model.gguf_file:
        problems.append("[model] name: missing; give a hub name or local path (or gguf_file, or a "
                        "[model.tiny] table)")
    if model is not None and model.gguf_file and model.tiny is not None:
        problems.append("[model] gguf_file and [model.tiny]: give one model source, not both")
    if model is not None and model.tiny is None:
        _check_model_source(model, problems)
    if model is not None and model.tiny is not None:
        from rlctl.models import tiny_spec
        check_call(tiny_spec, model.tiny, "model.tiny", problems)
    if model is not None and model.lora is not None:
        from rlctl.lora import lora_options
        before = len(problems)
        kwargs = check_call(lora_options, model.lora, "model.lora", problems)
        if len(problems) == before:
            try:
                lora_options(**kwargs)
            except ValueError as exc:
                problems.append(f"[model.lora] {exc}")

    base_components = {kind: doc.get(kind) for kind in COMPONENT_SECTIONS}
    stages_doc = doc.get("stage")
    stages: list[Stage] = []
    if train is not None:
        if stages_doc is None:
            stages.append(_make_stage("main", train.steps, train, base_components, {}, "", problems))
        elif not isinstance(stages_doc, list) or not stages_doc:
            problems.append("[[stage]]: expected one or more [[stage]] tables")
        else:
            for i, sdoc in enumerate(stages_doc):
                stage = _parse_stage(i, sdoc, train, base_components, problems)
                if stage is not None:
                    stages.append(stage)
            if "steps" in doc.get("train", {}) and stages and train.steps != sum(s.steps for s in stages):
                problems.append(f"[train] steps = {train.steps}: the [[stage]] steps add up to "
                                f"{sum(s.steps for s in stages)}; remove [train] steps or make them agree")

    if problems:
        raise RecipeError(problems, source=source)
    if stages_doc is not None:
        train.steps = sum(s.steps for s in stages)
    recipe = Recipe(source, model, data, train, evalc, stages, raw=doc)
    _check_semantics(recipe, problems)
    if check_components and not problems:
        from rlctl.data import check_data_config
        check_data_config(recipe.data, problems)
        for i, stage in enumerate(recipe.stages):
            if stage.data is not None:
                check_data_config(stage.data, problems, section=f"stage[{i}].data")
            check_stage_components(stage, problems)
    if problems:
        raise RecipeError(problems, source=source)
    return recipe


def _parse_stage(i: int, sdoc: Any, train: TrainConfig, base: dict[str, Any],
                 problems: list[str]) -> Stage | None:
    where = f"stage[{i}]"
    if not isinstance(sdoc, dict):
        problems.append(f"[{where}]: expected a table")
        return None
    allowed = ("name", "steps", "train", "data", *COMPONENT_SECTIONS)
    for key in sdoc:
        if key not in allowed:
            problems.append(unknown_key_message(f"{where}.{key}", key, allowed))
    steps = sdoc.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        problems.append(f"[{where}] steps = {steps!r}: expected a positive integer")
        steps = 1
    name = sdoc.get("name", f"stage{i}")
    overrides = sdoc.get("train", {})
    if not isinstance(overrides, dict):
        problems.append(f"[{where}.train]: expected a table")
        overrides = {}
    for key in overrides:
        if key not in STAGE_TRAIN_KEYS:
            problems.append(unknown_key_message(f"{where}.train.{key}", key, STAGE_TRAIN_KEYS))
    stage = _make_stage(str(name), steps, train, base, sdoc, where, problems, overrides)
    if "data" in sdoc:
        if isinstance(sdoc["data"], dict):
            stage.data = sdoc["data"]
        else:
            problems.append(f"[{where}.data]: expected a table like [data]")
    return stage


def _make_stage(name: str, steps: int, train: TrainConfig, base: dict[str, Any], sdoc: dict[str, Any],
                where: str, problems: list[str], train_overrides: dict[str, Any] | None = None) -> Stage:
    stage_train = train
    if train_overrides:
        merged = {**dataclasses.asdict(train), **{k: v for k, v in train_overrides.items()
                                                 if k in STAGE_TRAIN_KEYS}}
        stage_train = to_dataclass(TrainConfig, merged, f"{where}.train", problems) or train
    components: dict[str, Any] = {}
    for kind in COMPONENT_SECTIONS:
        value, origin = (sdoc[kind], f"{where}.{kind}") if kind in sdoc else (base[kind], kind)
        if kind == "reward":
            components[kind] = _parse_rewards(value, origin, problems)
        else:
            components[kind] = _parse_component(value, origin, problems)
    for kind in ("sampler", "loss"):
        if components[kind] is None:
            problems.append(f"[{where + '.' if where else ''}{kind}]: missing; every stage needs a "
                            f"{kind} (e.g. use = {'hf' if kind == 'sampler' else 'ppo_clip'!r})")
    return Stage(name=name, steps=steps, train=stage_train, components=components)


def _parse_component(value: Any, section: str, problems: list[str]) -> ComponentSpec | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.append(f"[{section}]: expected a table with use = \"name\", got {value!r}")
        return None
    options = dict(value)
    use = options.pop("use", None)
    if not isinstance(use, str) or not use:
        problems.append(f"[{section}] use: missing; name the component to use, e.g. use = \"...\"")
        return None
    return ComponentSpec(section=section, use=use, options=options)


def _parse_rewards(value: Any, section: str, problems: list[str]) -> list[ComponentSpec]:
    if value is None:
        return []
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        problems.append(f"[[{section}]]: expected an array of tables ([[reward]])")
        return []
    specs = []
    for i, item in enumerate(value):
        spec = _parse_component(item, f"{section}[{i}]", problems)
        if spec is None:
            continue
        weight = spec.options.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            problems.append(f"[{spec.section}] weight = {weight!r}: expected a number")
            weight = 1.0
        name = spec.options.pop("name", spec.use)
        spec.weight, spec.name = float(weight), str(name)
        specs.append(spec)
    names = [s.name for s in specs]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"[[{section}]]: two rewards are named {dup!r}; give each a distinct name = \"...\"")
    return specs


def _check_model_source(model: ModelConfig, problems: list[str]) -> None:
    """A local model directory or GGUF file must exist (cheap checks; hub names are checked at run)."""
    from rlctl.models import resolve_model_path
    from rlctl.model_import import resolve_gguf

    if not isinstance(model.name, str) or not isinstance(model.gguf_file, (str, type(None))):
        return  # a type error, reported elsewhere
    try:
        if model.gguf_file and not model.name:
            resolve_gguf(model.gguf_file)
        elif model.name and not model.gguf_file:
            resolve_model_path(model)
    except RlctlError as exc:
        problems.append(str(exc))
    except (RuntimeError, OSError, ValueError) as exc:  # e.g. "~nobody" (no such user), NUL in a path
        problems.append(f"[model] name = {model.name!r}: not a usable path ({exc})")


def _check_semantics(recipe: Recipe, problems: list[str]) -> None:
    t = recipe.train
    if t.engine == "fsdp2" and recipe.model.lora is not None:
        problems.append('[train] engine = "fsdp2" with [model.lora]: not supported; LoRA trains with '
                        'engine = "auto" (one process or DDP), where only the adapters are updated')
    if t.engine == "fsdp2" and t.mixed_precision == "fp16":
        problems.append('[train] mixed_precision = "fp16": the fsdp2 engine accepts "no" or "bf16"')
    if len(t.adam_betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.adam_betas):
        problems.append(f"[train] adam_betas = {t.adam_betas!r}: expected two numbers in [0, 1)")
    for stage in recipe.stages:
        st, where = stage.train, ("[train]" if stage.name == "main" and len(recipe.stages) == 1
                                  else f"[stage '{stage.name}'.train]")
        for key in ("prompts_per_step", "group_size", "ppo_epochs", "mini_batches", "max_sampling_rounds"):
            if getattr(st, key) < 1:
                problems.append(f"{where} {key} = {getattr(st, key)}: must be >= 1")
        if st.lr <= 0:
            problems.append(f"{where} lr = {st.lr}: must be > 0 (typical: 1e-6 for 0.5B models, 1e-4 tiny)")
        if st.max_grad_norm < 0:
            problems.append(f"{where} max_grad_norm = {st.max_grad_norm}: must be >= 0 (0 disables clipping)")
        if st.micro_batch_size < 0:
            problems.append(f"{where} micro_batch_size = {st.micro_batch_size}: must be >= 0")
        if st.max_staleness < 0:
            problems.append(f"{where} max_staleness = {st.max_staleness}: must be >= 0 (0: synchronous; k: "
                            "rollouts at most k policy versions old)")
        if st.partial_rollouts and st.max_staleness == 0:
            problems.append(f"{where} partial_rollouts = true: needs max_staleness >= 1 (with synchronous "
                            "rollouts no weights change while a batch is sampled)")
        if st.max_staleness > 0 and t.engine == "fsdp2":
            problems.append(f"{where} max_staleness = {st.max_staleness}: asynchronous rollouts need "
                            'engine = "auto" (one learner process); the fsdp2 engine samples in lockstep')
        if st.prompts_per_step >= 1 and st.mini_batches > st.prompts_per_step:
            problems.append(f"{where} mini_batches = {st.mini_batches}: more than prompts_per_step = "
                            f"{st.prompts_per_step} (mini-batches hold whole groups)")
    from rlctl.metrics import TRACKERS
    for name in t.trackers:
        if name not in TRACKERS:
            problems.append(f"[train] trackers: {name!r} is not a tracker; accepted: {', '.join(TRACKERS)}")
    from rlctl.train.rundir import check_output_dir, format_output_dir
    try:
        check_output_dir(format_output_dir(t.output_dir, recipe.name), given=t.output_dir)
    except RecipeError as exc:
        problems.extend(exc.problems)
    for key in ("save_every", "keep_checkpoints", "threads", "rollout_threads"):
        if getattr(t, key) < 0:
            problems.append(f"[train] {key} = {getattr(t, key)}: must be >= 0")
    if t.max_bad_steps < 1:
        problems.append(f"[train] max_bad_steps = {t.max_bad_steps}: must be >= 1")
    if not 0 <= t.max_reward_failure_rate <= 1:
        problems.append(f"[train] max_reward_failure_rate = {t.max_reward_failure_rate}: must be in [0, 1]")
    if recipe.eval.num_prompts < 0 or recipe.eval.every < 0:
        problems.append("[eval] num_prompts and every must be >= 0")



def to_dataclass(cls: type, values: Any, section: str, problems: list[str]) -> Any | None:
    """A core section's table as an instance of its dataclass, each key checked against the fields."""
    if not isinstance(values, dict):
        problems.append(f"[{section}]: expected a table, got {values!r}")
        return None
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            problems.append(unknown_key_message(f"{section}.{key}", key, names))
            continue
        ok, converted, expected = coerce(value, hints[key])
        if not ok:
            problems.append(f"[{section}] {key} = {value!r}: expected {expected}")
            continue
        kwargs[key] = converted
    return cls(**kwargs)
