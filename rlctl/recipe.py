"""Recipes: TOML -> a typed, validated ``Recipe``, with includes, ``--set`` overrides and stages.

Everything is checked before any model loads, and every problem is reported at once, one line each,
naming the key path, the bad value and what is accepted.

Layout of a recipe (see docs/recipes.md)::

    include = "base.toml"             # optional: deep-merged under this file
    [model]  [data]  [train]  [eval]  # core sections (dataclasses below)
    [sampler] [[reward]] [advantage] [loss] [scheduler]   # components: use = "name", options...
    [[stage]]                         # optional: consecutive stages overriding the sections above
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import difflib
import inspect
import os
import stat
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from rlctl.errors import PluginError, RecipeError

COMPONENT_SECTIONS = ("sampler", "reward", "advantage", "loss", "scheduler")
CORE_SECTIONS = ("model", "data", "train", "eval")
TOP_LEVEL_KEYS = ("include", "stage", *CORE_SECTIONS, *COMPONENT_SECTIONS)


# ------------------------------------------------------------------------------- core sections
@dataclass
class ModelConfig:
    name: str = ""  # hub name or local directory (for `tiny`: where to build it; empty = cache)
    tiny: dict | None = None  # build a tiny random model: arch, hidden_size, num_layers, num_heads ...
    lora: dict | None = None  # LoRA adapters (peft): r, alpha, dropout, target_modules, save
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    trust_remote_code: bool = False
    revision: str | None = None
    # a GGUF file (a path, or "package:file.gguf" inside an installed Python package), converted once
    # into the rlctl cache; with `name` also given, a file name inside that directory or hub repository
    gguf_file: str | None = None


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 1e-6
    prompts_per_step: int = 8
    group_size: int = 8
    ppo_epochs: int = 1  # optimisation passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass
    micro_batch_size: int = 0  # samples per forward/backward (whole groups; gradient accumulation); 0 = whole mini-batch
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    seed: int = 0
    output_dir: str = "runs/{recipe}"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    reference: Literal["stage_start", "initial"] = "stage_start"  # reference policy for KL terms
    drop_uniform_groups: bool = False  # dynamic sampling: drop groups whose rewards are all equal
    max_sampling_rounds: int = 1  # extra sampling rounds to refill dropped groups
    save_final: bool = True
    save_every: int = 0  # write a checkpoint every N steps (always at the end and on Ctrl-C)
    keep_checkpoints: int = 2  # newest checkpoints kept
    max_bad_steps: int = 3  # consecutive non-finite updates before the run aborts (with a checkpoint)
    max_reward_failure_rate: float = 0.5  # share of completions a reward may fail on before the run stops
    trackers: list = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, trackio, mlflow


# Keys a [[stage]] may set for itself (the rest of [train] is shared by the whole run).
STAGE_TRAIN_KEYS = ("lr", "prompts_per_step", "group_size", "ppo_epochs", "mini_batches",
                    "micro_batch_size", "max_grad_norm", "weight_decay", "drop_uniform_groups",
                    "max_sampling_rounds", "reference")


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N steps (0: only at the end of each stage)
    num_prompts: int = 200
    max_new_tokens: int = 0  # 0: the sampler's max_new_tokens (or 64)
    batch_size: int = 64
    at_start: bool = False  # also evaluate before the first step


@dataclass
class ComponentSpec:
    section: str  # where it came from, e.g. "loss" or "stage[1].reward[0]"
    use: str
    options: dict[str, Any]
    weight: float = 1.0  # rewards only
    name: str = ""  # rewards only: metric name (default: use)


@dataclass
class Stage:
    name: str
    steps: int
    train: TrainConfig
    components: dict[str, Any]  # kind -> ComponentSpec (list of them for "reward"), or None
    data: dict[str, Any] | None = None  # the stage's own prompts (a curriculum); None: the recipe's [data]


@dataclass
class Recipe:
    source: str
    model: ModelConfig
    data: dict[str, Any]  # {"source": name, **options}; checked by rlctl.data
    train: TrainConfig
    eval: EvalConfig
    stages: list[Stage]
    raw: dict[str, Any]  # the merged document after includes and overrides

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source else "recipe"


# ------------------------------------------------------------------------------------ loading
MAX_INCLUDE_BYTES = 1 << 20  # per recipe file
MAX_INCLUDE_FILES = 64  # files read for one recipe, the recipe itself and every include counted
MAX_INCLUDE_DEPTH = 16  # includes within includes
MAX_NESTING = 64  # tables and arrays within each other

_USER_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("rlctl_user_code", default=True)


def user_code_allowed() -> bool:
    """False while a recipe is only being validated: components must not import or run user code then
    (``module:function`` references are looked up, not imported; ``trust_remote_code`` is not honoured)."""
    return _USER_CODE.get()


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                check_components: bool = True, user_code: bool = True) -> Recipe:
    """Read, merge includes, apply ``--set`` overrides and validate. Raises ``RecipeError``.

    ``user_code = False`` (``rlctl validate``) checks the recipe without importing or running user code.
    """
    path = Path(path)
    doc = read_toml_with_includes(path)
    for item in overrides:
        apply_override(doc, item, source=str(path))
    if overrides and _depth(doc) > MAX_NESTING:
        raise RecipeError(f"--set: tables and arrays nested more than {MAX_NESTING} levels deep; accepted: at "
                          f"most {MAX_NESTING}", source=str(path))
    token = _USER_CODE.set(user_code)
    try:
        return parse_recipe(doc, source=str(path), check_components=check_components)
    finally:
        _USER_CODE.reset(token)


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
    if _depth(doc) > MAX_NESTING:
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


def _depth(value: Any) -> int:
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


# ------------------------------------------------------------------------------------ parsing
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
    from rlctl.errors import RlctlError
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
        if st.prompts_per_step >= 1 and st.mini_batches > st.prompts_per_step:
            problems.append(f"{where} mini_batches = {st.mini_batches}: more than prompts_per_step = "
                            f"{st.prompts_per_step} (mini-batches hold whole groups)")
    from rlctl.metrics import TRACKERS
    for name in t.trackers:
        if name not in TRACKERS:
            problems.append(f"[train] trackers: {name!r} is not a tracker; accepted: {', '.join(TRACKERS)}")
    from rlctl.rundir import check_output_dir, format_output_dir
    try:
        check_output_dir(format_output_dir(t.output_dir, recipe.name), given=t.output_dir)
    except RecipeError as exc:
        problems.extend(exc.problems)
    for key in ("save_every", "keep_checkpoints"):
        if getattr(t, key) < 0:
            problems.append(f"[train] {key} = {getattr(t, key)}: must be >= 0")
    if t.max_bad_steps < 1:
        problems.append(f"[train] max_bad_steps = {t.max_bad_steps}: must be >= 1")
    if not 0 <= t.max_reward_failure_rate <= 1:
        problems.append(f"[train] max_reward_failure_rate = {t.max_reward_failure_rate}: must be in [0, 1]")
    if recipe.eval.num_prompts < 0 or recipe.eval.every < 0:
        problems.append("[eval] num_prompts and every must be >= 0")


# -------------------------------------------------------------------------- component checks
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


# ----------------------------------------------------------------------------- type checking
def to_dataclass(cls: type, values: Any, section: str, problems: list[str]) -> Any | None:
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


# ---------------------------------------------------------------------------------- printing
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
