"""Generate docs/recipe-reference.md from the recipe schema and the built-in components.

Sources: the dataclasses ``ModelConfig``, ``TrainConfig`` and ``EvalConfig`` in ``rlctl.recipe`` (types,
defaults and the comment after each field), the data sources in ``rlctl.data.SOURCES`` and the factory
signatures of every built-in component (third-party plugins are left out, so the page does not depend on
what happens to be installed).

    python docs/gen_reference.py          # rewrite docs/recipe-reference.md
    python docs/gen_reference.py --check  # exit 1 if it is out of date (tests/test_docs.py does this)
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "recipe-reference.md"

# Descriptions for fields whose definition carries no comment (a comment in rlctl/recipe/schema.py wins).
FALLBACK = {
    ("model", "name"): "hub name or local directory",
    ("model", "dtype"): "weights' dtype when loading",
    ("model", "trust_remote_code"): "allow model code from the hub (transformers' trust_remote_code)",
    ("model", "revision"): "hub revision (branch, tag or commit)",
    ("train", "steps"): "training steps (with [[stage]] tables: their sum, may be left out)",
    ("train", "lr"): "peak learning rate (AdamW); typical: 1e-6 for 0.5B-7B models, 1e-3 for tiny ones",
    ("train", "prompts_per_step"): "prompts sampled per step",
    ("train", "group_size"): "completions per prompt (a group)",
    ("train", "max_grad_norm"): "gradient-norm clipping (0 disables it)",
    ("train", "weight_decay"): "AdamW weight decay",
    ("train", "adam_betas"): "AdamW betas",
    ("train", "seed"): "seed for sampling, data order and initialisation",
    ("train", "output_dir"): "run directory; {recipe} is the recipe file's name",
    ("train", "mixed_precision"): "autocast for forward and backward passes",
    ("train", "device"): "auto: CUDA when available",
    ("eval", "num_prompts"): "held-out prompts evaluated (0: no evaluation)",
    ("eval", "batch_size"): "prompts per generation batch during evaluation",
    ("train", "save_final"): "save the final model and tokenizer to `final/` in the run directory",
}

KIND_TABLES = {
    "sampler": "[sampler]",
    "reward": "[[reward]]",
    "advantage": "[advantage]",
    "loss": "[loss]",
    "scheduler": "[scheduler]",
    "environment": "[sampler.env]",
}
KIND_INTRO = {
    "sampler": "Produces the completions of a step (required in every stage).",
    "reward": ("Scores completions; a recipe may list several `[[reward]]` tables. Besides the options "
               "below, every reward table accepts `weight` (a number, default 1.0: the total reward is the "
               "weighted sum) and `name` (the metric name, default: the `use` value)."),
    "advantage": "Turns rewards into per-token advantages (needed when the loss uses advantages).",
    "loss": "The objective minimised at every update (required in every stage).",
    "scheduler": "Sets the learning rate before every update (optional: the stage's `lr` otherwise).",
    "environment": ("What a multi-turn sampler (`multi_turn`, `multi_turn_demonstrations`) talks to between "
                    "the policy's turns, selected in the sampler's `env` table "
                    "([Multi-turn and tool use](environments.md))."),
}


_CODE = re.compile(r"(`+)(.+?)\1")


def _md(text: str) -> str:
    """Text for Markdown: ``<`` outside code spans is escaped so that it is not read as HTML."""
    out, last = [], 0
    for match in _CODE.finditer(text):
        out.append(text[last:match.start()].replace("<", "&lt;"))
        out.append(match.group(0))
        last = match.end()
    out.append(text[last:].replace("<", "&lt;"))
    return "".join(out)


def _cell(text: str) -> str:
    return _md(text).replace("|", "\\|").replace("\n", " ")


def _default(text: str) -> str:
    return f"*{text}*" if text in ("required", "unset") else "`" + text.replace("|", "\\|") + "`"


def _options_table(info) -> list[str]:
    if not info.options:
        return ["No options." if not info.takes_any else "Accepts any keys.", ""]
    rows = ["| key | type | default |", "|---|---|---|"]
    for o in info.options:
        rows.append(f"| `{o.name}` | {_cell(o.type_text(' or '))} | {_default(o.default_text())} |")
    if info.takes_any:
        rows.append("| (any other key) | | |")
    return [*rows, ""]


def _section(title: str, cls: type, section: str, per_stage: tuple[str, ...] = ()) -> list[str]:
    from rlctl.scaffold import dataclass_fields

    lines = [f"## `[{section}]`", ""]
    header = "| key | type | default | description |"
    sep = "|---|---|---|---|"
    if per_stage:
        header, sep = "| key | type | default | per stage | description |", "|---|---|---|---|---|"
    lines += [title, "", header, sep]
    for name, typ, default, comment in dataclass_fields(cls):
        desc = comment or FALLBACK.get((section, name), "")
        stage = (" yes |" if name in per_stage else " |") if per_stage else ""
        lines.append(f"| `{name}` | {_cell(typ)} | {_default(default)} |{stage} {_cell(desc)} |")
    return [*lines, ""]


def render() -> str:
    from rlctl import plugins
    from rlctl.data import SOURCES
    from rlctl.recipe import STAGE_TRAIN_KEYS, EvalConfig, ModelConfig, TrainConfig
    from rlctl.scaffold import describe_factory

    lines = [
        "# Recipe reference",
        "",
        "<!-- Generated by docs/gen_reference.py from rlctl/recipe/, rlctl/data/ and the built-in",
        "     components' signatures. Do not edit by hand: run `python docs/gen_reference.py`. -->",
        "",
        "Every key a recipe accepts, with its type and default. How recipes are put together (includes,",
        "`--set` overrides, stages) is explained in [Recipes](recipes.md). Options of third-party",
        "components are listed by `rlctl plugins --verbose`; `rlctl validate RECIPE` prints a recipe with",
        "every default filled in.",
        "",
        "Types are TOML types: `str` a string, `int` an integer, `float` any number, `bool` `true`/`false`,",
        "`list` an array, `dict` a table. *unset* means the key is absent by default (TOML has no null).",
        "",
    ]
    lines += _section("The policy to train.", ModelConfig, "model")
    lines += ["A tiny random model for tests and demos: `[model] tiny = { arch = \"llama\", hidden_size = 64 }`",
              "(keys: `arch` (`\"llama\"` or `\"qwen2\"`), `hidden_size`, `num_layers`, `num_heads`,",
              "`num_kv_heads`, `intermediate_size`, `max_position_embeddings`, `seed`).", ""]

    lines += ["## `[data]`", "",
              f"Where prompts come from: `source` (default `\"arithmetic\"`) is one of "
              f"{', '.join(f'`{s}`' for s in SOURCES)}; the other keys are that source's options.", ""]
    for name, fn in SOURCES.items():
        info = describe_factory(fn)
        lines += [f"### `source = \"{name}\"`", "", _md(info.summary), "", *_options_table(info)]

    lines += _section("Optimisation and run settings, shared by all stages unless marked *per stage* "
                      "(a `[[stage]]` table's `train = { ... }` may set those for itself).",
                      TrainConfig, "train", STAGE_TRAIN_KEYS)
    lines += _section("Held-out evaluation: greedy completions of the data source's eval prompts, scored "
                      "with the recipe's rewards.", EvalConfig, "eval")

    lines += ["## `[[stage]]`", "",
              "Optional consecutive stages. Each takes `name`, `steps` (required), `train = { ... }` (the",
              "*per stage* keys above) and any component table, which replaces the top-level one for that",
              "stage; tables it does not set are inherited from the top level.", ""]

    lines += ["## Components", "",
              "A component table selects a registered component with `use = \"name\"`; its other keys are",
              "the component's options, checked against the factory's signature before any model loads.", ""]
    old = os.environ.get("RLCTL_LOAD_PLUGINS")
    os.environ["RLCTL_LOAD_PLUGINS"] = ""  # built-ins only
    plugins.reset()
    try:
        for kind, table in KIND_TABLES.items():
            lines += [f"### `{table}`", "", KIND_INTRO[kind], ""]
            for comp in (c for c in plugins.components() if c.kind == kind):
                info = describe_factory(comp.factory)
                lines += [f"#### `use = \"{comp.name}\"`", "",
                          f"{_md(info.summary)} *(plugin `{comp.plugin}`)*".strip(), "", *_options_table(info)]
    finally:
        if old is None:
            os.environ.pop("RLCTL_LOAD_PLUGINS", None)
        else:
            os.environ["RLCTL_LOAD_PLUGINS"] = old
        plugins.reset()
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is out of date: run python docs/gen_reference.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
