"""Recipe loading: good recipes resolve; every bad recipe names the key, the value and what is accepted."""

from __future__ import annotations

import sys

import pytest

from rlctl.errors import RecipeError
from rlctl.recipe import apply_override, dumps_toml, load_recipe, parse_value, resolved_dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from conftest import write_recipe

BASE = """
[model]
name = "some/model"

[sampler]
use = "hf"
max_new_tokens = 8

[[reward]]
use = "exact"

[advantage]
use = "grpo"

[loss]
use = "ppo_clip"
clip_low = 0.2
clip_high = 0.28

[train]
steps = 5
lr = 1e-5
"""


def load_text(tmp_path, text, overrides=()):
    return load_recipe(write_recipe(tmp_path, text), overrides)


def error_of(tmp_path, text, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_text(tmp_path, text, overrides)
    return str(info.value)


def test_good_recipe_resolves_with_defaults(tmp_path):
    recipe = load_text(tmp_path, BASE)
    assert recipe.total_steps == 5
    (stage,) = recipe.stages
    assert stage.name == "main"
    assert stage.components["loss"].use == "ppo_clip"
    assert stage.components["loss"].options == {"clip_low": 0.2, "clip_high": 0.28}
    assert stage.components["reward"][0].weight == 1.0
    assert recipe.train.group_size == 8  # default
    assert recipe.data == {"source": "arithmetic"}


def test_unknown_key_suggests_the_close_one(tmp_path):
    msg = error_of(tmp_path, BASE.replace("clip_high = 0.28", "clip_hgh = 0.28"))
    assert "[loss] clip_hgh: unknown key; did you mean 'clip_high'?" in msg
    assert "Accepted:" in msg and "clip_low" in msg


def test_unknown_core_key_and_section(tmp_path):
    msg = error_of(tmp_path, BASE + "\n[trian]\nx = 1\n")
    assert "trian: unknown key; did you mean 'train'?" in msg
    msg = error_of(tmp_path, BASE.replace("lr = 1e-5", "lr = 1e-5\nprompts_per_stp = 4"))
    assert "[train] prompts_per_stp: unknown key; did you mean 'prompts_per_step'?" in msg


def test_wrong_types_name_key_value_and_expectation(tmp_path):
    msg = error_of(tmp_path, BASE.replace("steps = 5", 'steps = "five"'))
    assert "[train] steps = 'five': expected an integer" in msg
    msg = error_of(tmp_path, BASE.replace("clip_low = 0.2", "clip_low = true"))
    assert "[loss] clip_low = True: expected a number" in msg
    msg = error_of(tmp_path, BASE.replace('name = "some/model"', 'name = "m"\ndtype = "fp8"'))
    assert "[model] dtype = 'fp8': expected one of 'float32', 'bfloat16', 'float16', 'auto'" in msg


def test_unknown_plugin_name_lists_available(tmp_path):
    msg = error_of(tmp_path, BASE.replace('use = "grpo"', 'use = "grop"'))
    assert "[advantage] use = 'grop': advantage 'grop' is not available (plugin may not be installed)." in msg
    assert "Did you mean 'grpo'?" in msg


def test_component_value_errors_are_reported_by_section(tmp_path):
    msg = error_of(tmp_path, BASE.replace('clip_low = 0.2', 'clip_low = 0.2\naggregation = "mean"'))
    assert "[loss] (use = 'ppo_clip'): aggregation = 'mean': accepted values are token-mean" in msg


def test_bad_numbers(tmp_path):
    msg = error_of(tmp_path, BASE.replace("lr = 1e-5", "lr = -1.0\ngroup_size = 0"))
    assert "[train] lr = -1.0: must be > 0" in msg
    assert "[train] group_size = 0: must be >= 1" in msg
    assert len(msg.splitlines()) == 2  # every problem at once, one line each


def test_missing_sections(tmp_path):
    msg = error_of(tmp_path, "[model]\nname = 'x'\n")
    assert "[sampler]: missing" in msg and "[loss]: missing" in msg
    msg = error_of(tmp_path, BASE.replace('[advantage]\nuse = "grpo"\n', ""))
    assert "needs advantages, but there is no [advantage] section" in msg


def test_include_and_override(tmp_path):
    write_recipe(tmp_path, BASE, "base.toml")
    child = 'include = "base.toml"\n[loss]\nuse = "ppo_clip"\nclip_high = 0.3\n[train]\nsteps = 9\n'
    recipe = load_text(tmp_path, child, overrides=["train.lr=3e-4", "reward.0.weight=0.5"])
    loss = recipe.stages[0].components["loss"]
    assert loss.options == {"clip_low": 0.2, "clip_high": 0.3}  # tables merge key by key
    assert recipe.train.steps == 9 and recipe.train.lr == pytest.approx(3e-4)
    assert recipe.stages[0].components["reward"][0].weight == 0.5


def test_include_cycle_is_an_error(tmp_path):
    write_recipe(tmp_path, 'include = "b.toml"\n', "a.toml")
    write_recipe(tmp_path, 'include = "a.toml"\n', "b.toml")
    with pytest.raises(RecipeError, match="include cycle"):
        load_recipe(tmp_path / "a.toml")


def test_override_parsing():
    doc = {"loss": {"use": "x"}, "reward": [{"use": "exact"}]}
    apply_override(doc, "loss.clip_high=0.3")
    apply_override(doc, "loss.aggregation=token-mean")  # bare words are strings
    apply_override(doc, "reward.0.weight=2")
    assert doc == {"loss": {"use": "x", "clip_high": 0.3, "aggregation": "token-mean"},
                   "reward": [{"use": "exact", "weight": 2}]}
    assert parse_value("[1, 2]") == [1, 2] and parse_value("true") is True
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        apply_override(doc, "loss.clip_high")
    with pytest.raises(RecipeError, match="index below 1"):
        apply_override(doc, "reward.3.weight=1")


def test_stages_override_sections_and_train_keys(tmp_path):
    text = BASE.replace("steps = 5\n", "") + """
[[stage]]
name = "warmup"
steps = 3
sampler = { use = "demonstrations" }
loss = { use = "sft" }
train = { lr = 1e-3 }

[[stage]]
name = "rl"
steps = 4
"""
    recipe = load_text(tmp_path, text)
    warm, rl = recipe.stages
    assert (warm.name, warm.steps, warm.train.lr) == ("warmup", 3, 1e-3)
    assert warm.components["loss"].use == "sft" and warm.components["loss"].section == "stage[0].loss"
    assert rl.components["loss"].use == "ppo_clip" and rl.train.lr == 1e-5
    assert recipe.total_steps == 7 and recipe.train.steps == 7


def test_stage_errors(tmp_path):
    msg = error_of(tmp_path, BASE + '\n[[stage]]\nsteps = 0\nlosss = { use = "sft" }\n')
    assert "[stage[0]] steps = 0: expected a positive integer" in msg
    assert "[stage[0]] losss: unknown key; did you mean 'loss'?" in msg
    msg = error_of(tmp_path, BASE + '\n[[stage]]\nsteps = 2\ntrain = { seed = 3 }\n')
    assert "[stage[0].train] seed: unknown key" in msg


def test_resolved_recipe_round_trips_through_toml(tmp_path):
    recipe = load_text(tmp_path, BASE)
    text = dumps_toml(resolved_dict(recipe))
    again = load_text(tmp_path, text)
    assert resolved_dict(again) == resolved_dict(recipe)
    assert tomllib.loads(text)["loss"] == {"use": "ppo_clip", "clip_low": 0.2, "clip_high": 0.28}


def test_invalid_toml_is_one_line(tmp_path):
    msg = error_of(tmp_path, "[model\nname = 1")
    assert "invalid TOML" in msg and len(msg.splitlines()) == 1
