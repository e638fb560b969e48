"""The shipped recipes: every ``recipes/*.toml`` validates, and every one trains end to end.

Recipes are found by glob, so a new recipe is covered as soon as it is added. The runs are shrunk with
``--set``-style overrides (one step per stage, or two steps without stages; two prompts per step; four
held-out prompts) and then checked against what the recipe's family must produce in ``metrics.jsonl``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from rlctl.components import stage_needs
from rlctl.metrics import read_metrics
from rlctl.recipe import Recipe, check_stage_components, load_recipe
from rlctl.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))
LOCAL_DATA = ("arithmetic", "jsonl")  # data sources that need no download
ALGORITHM_DOCS = sorted((ROOT / "docs" / "algorithms").glob("*.md"))


def test_recipes_are_found():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo", "gspo", "dapo", "reft"} <= names


# ------------------------------------------------------------------------------------ validation
def _rl_stage(recipe: Recipe):
    """The stage that samples and rewards (the last one whose loss is not SFT)."""
    return [s for s in recipe.stages if s.components["loss"].use != "sft"][-1]


def _opt(stage, kind: str, key: str, default: Any = None) -> Any:
    return stage.components[kind].options.get(key, default)


def _check_dr_grpo(recipe: Recipe) -> None:
    rl = _rl_stage(recipe)
    assert rl.components["advantage"].use == "dr_grpo"
    assert rl.components["loss"].use == "ppo_clip"
    assert _opt(rl, "loss", "aggregation") == "constant"
    # the unbiased loss divides by the token budget: keep the two in step
    assert _opt(rl, "loss", "normalizer") == _opt(rl, "sampler", "max_new_tokens")


def _check_dapo(recipe: Recipe) -> None:
    rl = _rl_stage(recipe)
    assert rl.components["advantage"].use == "grpo"
    assert rl.components["loss"].use == "ppo_clip"
    assert _opt(rl, "loss", "clip_high") == pytest.approx(0.28)
    assert _opt(rl, "loss", "clip_high") > _opt(rl, "loss", "clip_low", 0.2)
    assert _opt(rl, "loss", "aggregation", "token-mean") == "token-mean"
    assert rl.train.drop_uniform_groups and rl.train.max_sampling_rounds == 3
    rewards = {r.use: r for r in rl.components["reward"]}
    assert list(rewards) == ["exact", "overlong"]  # the first reward defines accuracy
    assert all(r.weight > 0 for r in rewards.values())
    assert rewards["overlong"].options["max_len"] == _opt(rl, "sampler", "max_new_tokens")


def _check_ppo(recipe: Recipe) -> None:
    rl = _rl_stage(recipe)
    assert (rl.components["advantage"].use, rl.components["loss"].use) == ("gae", "ppo")
    assert (rl.train.ppo_epochs, rl.train.mini_batches) == (2, 2)


def _check_reft(recipe: Recipe) -> None:
    warmup, rl = recipe.stages
    assert (warmup.components["sampler"].use, warmup.components["loss"].use) == ("demonstrations", "sft")
    assert (rl.components["sampler"].use, rl.components["loss"].use) == ("hf", "ppo")
    assert rl.components["advantage"].use == "gae" and _opt(rl, "advantage", "kl_coef") > 0
    assert [r.use for r in rl.components["reward"]] == ["reft"]
    assert rl.train.reference == "stage_start"  # KL to the warm-up policy


def _check_gspo(recipe: Recipe) -> None:
    rl = _rl_stage(recipe)
    assert rl.components["loss"].use == "gspo"
    assert rl.train.ppo_epochs * rl.train.mini_batches > 1  # the sequence clip only acts off-policy


def _check_uses(advantage: str, loss: str) -> Callable[[Recipe], None]:
    def check(recipe: Recipe) -> None:
        rl = _rl_stage(recipe)
        assert (rl.components["advantage"].use, rl.components["loss"].use) == (advantage, loss)
    return check


CONTENT_CHECKS: dict[str, Callable[[Recipe], None]] = {
    "grpo": _check_uses("grpo", "ppo_clip"),
    "dr_grpo": _check_dr_grpo,
    "rloo": _check_uses("rloo", "ppo_clip"),
    "reinforce_pp": _check_uses("reinforce_pp", "ppo_clip"),
    "ppo": _check_ppo,
    "gspo": _check_gspo,
    "dapo": _check_dapo,
    "reft": _check_reft,
}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path):
    recipe = load_recipe(path)  # types, component options, data: everything but the model
    assert recipe.total_steps >= 1
    if recipe.model.tiny is not None:  # a CPU demo: it must say what to change for a real model
        text = path.read_text()
        assert re.search(r'^#.*name = "[^"]+/[^"]+"', text, re.M), "add a commented-out real model name"
    if path.stem in CONTENT_CHECKS:  # the family recipes run on a CPU as shipped
        assert recipe.model.tiny is not None and recipe.data.get("source") == "arithmetic"
        CONTENT_CHECKS[path.stem](recipe)


@pytest.mark.parametrize("doc", ALGORITHM_DOCS, ids=lambda p: p.stem)
def test_algorithm_docs_point_at_existing_recipes(doc):
    for name in re.findall(r"recipes/([\w.-]+\.toml)", doc.read_text()):
        assert (ROOT / "recipes" / name).exists(), f"{doc.name} points at missing recipes/{name}"


# ---------------------------------------------------------------------------------------- runs
def shrink(path: Path) -> list[str]:
    """Overrides that keep a recipe's algorithm and make it run in seconds: 2 steps in total for a
    single-stage recipe, 1 per stage otherwise; 2 prompts per step; 4 held-out prompts."""
    raw = load_recipe(path).raw
    out = ["train.prompts_per_step=2", "eval.num_prompts=4", "eval.every=0"]
    if raw.get("data", {}).get("source", "arithmetic") == "arithmetic":
        out.append("data.num_eval=4")
    stages = raw.get("stage")
    if stages:
        for i, stage in enumerate(stages):
            out.append(f"stage.{i}.steps=1")
            if "prompts_per_step" in stage.get("train", {}):
                out.append(f"stage.{i}.train.prompts_per_step=2")
    else:
        out.append("train.steps=2")
    return out



def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _expect_kl(trainer, steps, evals):
    rl = [r for r in steps if "clip_frac" in r]
    assert rl and all(finite(r["kl"]) and r["kl"] >= -1e-6 for r in rl)  # k2 / k3 are >= 0
    assert trainer.reference is not None


def _expect_no_reference(trainer, steps, evals):
    assert all("kl" not in r for r in steps)
    assert trainer.reference is None  # no KL term: no reference model is loaded


def _expect_clip_stats(trainer, steps, evals):
    for r in steps:
        assert 0.0 <= r["clip_frac"] <= 1.0 and finite(r["ratio_mean"]) and r["ratio_mean"] > 0


def _expect_ppo(trainer, steps, evals):
    _expect_clip_stats(trainer, steps, evals)
    for r in steps:
        assert finite(r["value_loss"]) and r["value_loss"] >= 0 and finite(r["policy_loss"])
        assert "value_clip_frac" in r
    assert trainer.value_head is not None
    assert (trainer.output_dir / "final" / "value_head.safetensors").exists()


def _expect_dapo(trainer, steps, evals):
    rl = [r for r in steps if r["stage"] != "warmup"]
    _expect_clip_stats(trainer, rl, evals)
    for r in rl:
        assert "reward/exact" in r and "reward/overlong" in r
        assert -1.0 <= r["reward/overlong"] <= 0.0
        assert 1 < r.get("sampling_rounds", 2) <= 3  # only logged when a step sampled again
        assert r["samples"] % 8 == 0 and r["samples"] <= 2 * 8  # whole groups, at most the batch
    _expect_no_reference(trainer, steps, evals)


def _expect_reft(trainer, steps, evals):
    assert [r["stage"] for r in steps] == ["warmup", "reft"]
    warmup, rl = steps
    assert finite(warmup["nll"]) and warmup["loss"] == pytest.approx(warmup["nll"])
    assert 0.0 <= rl["reward/reft"] <= 1.0 and finite(rl["value_loss"])
    assert trainer.reference is not None  # the KL penalty in the reward needs the warm-up policy
    assert trainer.value_head is not None
    # the SFT stage is evaluated with the RL stage's reward
    assert [e["eval"] for e in evals] == ["warmup", "reft"]


RUN_CHECKS: dict[str, list[Callable]] = {
    "grpo": [_expect_clip_stats, _expect_kl],
    "dr_grpo": [_expect_clip_stats, _expect_no_reference],
    "rloo": [_expect_clip_stats, _expect_no_reference],
    "reinforce_pp": [_expect_clip_stats, _expect_kl],
    "ppo": [_expect_ppo],
    "gspo": [_expect_clip_stats, _expect_no_reference],
    "dapo": [_expect_dapo],
    "reft": [_expect_reft],
}


def _offline(path: Path) -> bool:
    """A recipe that trains offline on a CPU (a tiny model, local data)."""
    recipe = load_recipe(path, check_components=False)
    return recipe.model.tiny is not None and recipe.data.get("source", "arithmetic") in LOCAL_DATA


# Recipes for real models and hub datasets run here on a tiny model and local data in their own tests.
REAL_MODEL_RECIPES = {"grpo_gsm8k": "tests/test_selection.py", "smollm2_word_problems": "tests/test_real_model.py",
                      "smollm2_calculator": "tests/test_multi_turn.py"}
OFFLINE_RECIPES = [p for p in RECIPES if p.stem not in REAL_MODEL_RECIPES]


def test_every_recipe_is_run_somewhere():
    for path in RECIPES:
        assert _offline(path) != (path.stem in REAL_MODEL_RECIPES), path.name
    root = Path(__file__).parent.parent
    for name, test_file in REAL_MODEL_RECIPES.items():
        assert f"{name}.toml" in (root / test_file).read_text(), (name, test_file)


@pytest.mark.slow
@pytest.mark.parametrize("path", OFFLINE_RECIPES, ids=[p.stem for p in OFFLINE_RECIPES])
def test_recipe_runs(path, tmp_path):
    recipe = load_recipe(path, shrink(path))
    expected_steps = len(recipe.stages) if recipe.raw.get("stage") else 2
    assert recipe.total_steps == expected_steps
    trainer = Trainer(recipe, output_dir=tmp_path / path.stem, show_progress=False)
    summary = trainer.run()

    rows = read_metrics(tmp_path / path.stem / "metrics.jsonl")
    steps = [r for r in rows if "eval" not in r]
    evals = [r for r in rows if "eval" in r]
    assert [r["step"] for r in steps] == list(range(expected_steps))
    assert summary["steps"] == expected_steps
    # stages whose components use rewards (SFT and DPO stages score nothing while training)
    scored = {s.name for s in recipe.stages
              if {"rewards", "advantages"} & stage_needs(check_stage_components(s, []))}
    for r in steps:
        assert finite(r["loss"]) and finite(r["grad_norm"]), r
        assert r["samples"] > 0 and r["tokens"] > 0
        if r["stage"] in scored:
            assert finite(r["reward"]) and 0.0 <= r["accuracy"] <= 1.0
        else:
            assert "reward" not in r
    # held-out evaluation after every stage (on the 4 prompts left) when some stage has a reward
    has_reward = any(s.components["reward"] for s in recipe.stages)
    assert [e["eval"] for e in evals] == ([s.name for s in recipe.stages] if has_reward else [])
    assert all(0.0 <= e["eval/accuracy"] <= 1.0 for e in evals)
    assert (tmp_path / path.stem / "final" / "model.safetensors").exists()
    for check in RUN_CHECKS.get(path.stem, []):
        check(trainer, steps, evals)
