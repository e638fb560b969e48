"""The training loop on a tiny model: metrics, stages, determinism, saved outputs."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import grpo_recipe, write_recipe
from rlctl.errors import ComponentError, RlctlError
from rlctl.metrics import TIMING_FIELDS, read_metrics
from rlctl.recipe import load_recipe
from rlctl.trainer import Trainer

pytestmark = pytest.mark.slow


def run(tmp_path, text, name="run", overrides=(), **kwargs):
    recipe = load_recipe(write_recipe(tmp_path, text, f"{name}.toml"), overrides)
    trainer = Trainer(recipe, output_dir=tmp_path / name, show_progress=False, **kwargs)
    summary = trainer.run()
    return trainer, summary, read_metrics(tmp_path / name / "metrics.jsonl")


def test_grpo_loop_writes_metrics_and_a_loadable_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer, summary, rows = run(tmp_path, grpo_recipe(tiny_model_dir, steps=3))
    steps = [r for r in rows if "eval" not in r]
    assert [r["step"] for r in steps] == [0, 1, 2]
    for key in ("reward", "accuracy", "reward/exact", "loss", "clip_frac", "grad_norm", "tokens_per_s", "lr"):
        assert key in steps[0], key
    assert steps[0]["tokens"] > 0 and 0.0 <= steps[0]["accuracy"] <= 1.0
    assert steps[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # on-policy single pass: ratio is 1
    evals = [r for r in rows if "eval" in r]
    assert len(evals) == 1 and evals[0]["eval"] == "main"
    assert summary["steps"] == 3 and "eval/main/accuracy" in summary
    assert trainer.reference is None  # no KL term: no reference model
    out = tmp_path / "run"
    assert (out / "final" / "model.safetensors").exists()
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert "ppo_clip" in (out / "recipe.resolved.toml").read_text()
    assert "torch" in json.loads((out / "versions.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out / "final")
    for (name, p), q in zip(trainer.policy_model.named_parameters(), reloaded.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_training_changes_the_weights(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer, _, _ = run(tmp_path, grpo_recipe(tiny_model_dir, steps=2, extra="[loss]\nuse='sft'\n")
                        .replace('[loss]\nuse = "ppo_clip"\n', ""))
    diffs = [(p - q).abs().max().item() for p, q in zip(trainer.policy_model.parameters(), before.parameters())]
    assert max(diffs) > 0


def text_dependent_reward(self, rollouts):
    """A reward that varies with the sampled text, so that an untrained model gets a gradient."""
    return torch.tensor([float(len(set(text)) % 3) for text in rollouts.completions])


def test_same_seed_same_metrics(tiny_model_dir, tmp_path, monkeypatch):
    from rlctl_plugins.rewards import ExactAnswerReward

    monkeypatch.setattr(ExactAnswerReward, "score", text_dependent_reward)
    text = grpo_recipe(tiny_model_dir, steps=3)
    _, _, a = run(tmp_path, text, name="a")
    _, _, b = run(tmp_path, text, name="b")
    strip = [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in a]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in b]
    assert a[1]["grad_norm"] > 0  # the comparison covers real updates
    _, _, c = run(tmp_path, text, name="c", overrides=["train.seed=8"])
    assert [r.get("grad_norm") for r in c] != [r.get("grad_norm") for r in a]


def test_stages_switch_components_and_reference(tiny_model_dir, tmp_path):
    text = grpo_recipe(tiny_model_dir).replace("steps = 3\n", "") + """
[[stage]]
name = "warmup"
steps = 2
sampler = { use = "demonstrations" }
loss = { use = "sft" }
train = { lr = 5e-3 }

[[stage]]
name = "rl"
steps = 2
loss = { use = "ppo_clip", kl_coef = 0.1 }
"""
    trainer, summary, rows = run(tmp_path, text)
    steps = [r for r in rows if "eval" not in r]
    assert [r["stage"] for r in steps] == ["warmup", "warmup", "rl", "rl"]
    assert "nll" in steps[0] and "reward" not in steps[0]  # SFT needs no rewards
    assert steps[0]["lr"] == pytest.approx(5e-3) and steps[2]["lr"] == pytest.approx(1e-3)
    assert "kl" in steps[2] and steps[2]["kl"] == pytest.approx(0.0, abs=1e-6)  # reference = policy at stage start
    assert trainer.reference is not None
    assert [r["eval"] for r in rows if "eval" in r] == ["warmup", "rl"]
    assert set(summary) >= {"eval/warmup/accuracy", "eval/rl/accuracy"}


def test_ppo_epochs_and_mini_batches(tiny_model_dir, tmp_path, monkeypatch):
    from rlctl_plugins.rewards import ExactAnswerReward

    monkeypatch.setattr(ExactAnswerReward, "score", text_dependent_reward)
    extra = "ppo_epochs = 2\nmini_batches = 2\n"
    _, _, rows = run(tmp_path, grpo_recipe(tiny_model_dir, steps=1, extra=extra))
    # four optimizer steps per batch: after the first, the ratio moves away from 1
    assert rows[0]["ratio_mean"] != pytest.approx(1.0, abs=1e-7)


def test_dynamic_sampling_keeps_only_informative_groups(tiny_model_dir, tmp_path, monkeypatch):
    from rlctl_plugins.rewards import ExactAnswerReward

    def half_uniform(self, rollouts):  # even groups all 1 (no signal), odd groups mixed
        return torch.tensor([1.0 if g % 2 == 0 else float(i % 2)
                             for i, g in enumerate(rollouts.group_ids.tolist())])

    from rlctl_plugins.samplers import HFGenerateSampler

    monkeypatch.setattr(ExactAnswerReward, "score", half_uniform)
    seen = []  # a sampler's observe() sees every scored batch before uniform groups are dropped
    monkeypatch.setattr(HFGenerateSampler, "observe", lambda self, r: seen.append((len(r), r.rewards is not None)),
                        raising=False)
    extra = "drop_uniform_groups = true\nmax_sampling_rounds = 3\n"
    _, _, rows = run(tmp_path, grpo_recipe(tiny_model_dir, steps=1, extra=extra))
    assert seen == [(16, True), (16, True)]
    # 4 prompts a round, 2 informative: two rounds fill the batch of 4 groups x 4 completions
    assert rows[0]["sampling_rounds"] == 2
    assert rows[0]["samples"] == 16
    assert rows[0]["reward"] == pytest.approx(0.75)  # metrics describe the first round, before filtering


def test_cosine_scheduler_sets_lr(tiny_model_dir, tmp_path):
    import math

    text = grpo_recipe(tiny_model_dir, steps=4) + '\n[scheduler]\nuse = "cosine"\n'
    _, _, rows = run(tmp_path, text)
    lrs = [r["lr"] for r in rows if "eval" not in r]
    # cosine over 4 steps without warm-up: lr * 0.5 (1 + cos(pi * s / 4)); half way = half the peak
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    assert lrs[2] == pytest.approx(0.5e-3)


def test_refuses_to_overwrite_a_run(tiny_model_dir, tmp_path):
    run(tmp_path, grpo_recipe(tiny_model_dir, steps=1))
    with pytest.raises(RlctlError, match="already holds a run; pass --overwrite"):
        run(tmp_path, grpo_recipe(tiny_model_dir, steps=1))
    _, _, rows = run(tmp_path, grpo_recipe(tiny_model_dir, steps=1), overwrite=True)
    assert len([r for r in rows if "eval" not in r]) == 1


def test_component_exception_names_plugin_and_section(tiny_model_dir, tmp_path, monkeypatch):
    from rlctl_plugins.policy_loss import ClippedPolicyLoss

    def broken(self, rollouts, logprobs, **extra):
        raise KeyError("advantages")

    monkeypatch.setattr(ClippedPolicyLoss, "compute", broken)
    with pytest.raises(ComponentError) as info:
        run(tmp_path, grpo_recipe(tiny_model_dir, steps=1))
    assert ("loss 'ppo_clip' (plugin rlctl_plugins.policy_loss, recipe section [loss]) raised KeyError"
            in str(info.value))


def test_a_stage_can_bring_its_own_data(tiny_model_dir, tmp_path):
    text = grpo_recipe(tiny_model_dir).replace("steps = 3\n", "") + """
[[stage]]
name = "easy"
steps = 1

[[stage]]
name = "hard"
steps = 1
data = { source = "arithmetic", num_train = 30, num_eval = 4, ops = ["*"], max_operand = 9 }
"""
    trainer, _, rows = run(tmp_path, text)
    assert all("*" in p.text for p in trainer.stream.prompts)  # the last stage's prompts
    assert all("+" in p.text for p in trainer._data[next(iter(trainer._data))][0].prompts)
    assert [r["stage"] for r in rows if "eval" not in r] == ["easy", "hard"]


def test_tensorboard_tracker_receives_the_metrics(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    text = grpo_recipe(tiny_model_dir, steps=2, extra='trackers = ["tensorboard"]\n')
    _, _, rows = run(tmp_path, text)
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = acc.Scalars("reward")
    assert [e.step for e in logged] == [0, 1]
    assert [e.value for e in logged] == pytest.approx([r["reward"] for r in rows if "eval" not in r])


def test_unknown_tracker_is_a_recipe_error(tiny_model_dir, tmp_path):
    from rlctl.errors import RecipeError

    with pytest.raises(RecipeError, match=r"\[train\] trackers: 'neptune' is not a tracker; accepted: tensorboard"):
        load_recipe(write_recipe(tmp_path, grpo_recipe(tiny_model_dir, extra='trackers = ["neptune"]\n')))


def test_dpo_reference_is_scored_once_per_pair_and_starts_at_log2(tmp_path, monkeypatch):
    import math

    from rlctl.train.reference import Reference

    scored = []
    original = Reference.score
    monkeypatch.setattr(Reference, "score", lambda self, r: scored.append(len(r)) or original(self, r))
    overrides = ["data.num_train=8", "data.num_eval=4", "train.prompts_per_step=4", "stage.0.steps=1",
                 "stage.0.train.prompts_per_step=4", "stage.1.steps=4", "model.tiny.hidden_size=32"]
    from pathlib import Path

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / "dpo.toml", overrides)
    Trainer(recipe, output_dir=tmp_path / "run", show_progress=False).run()
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval" not in r]
    dpo = [r for r in rows if r["stage"] == "dpo"]
    assert len(dpo) == 4
    assert dpo[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at the stage start
    assert sum(scored) == 16  # 8 prompts x 2 completions, although 4 steps visit every pair twice


def test_a_step_without_signal_is_skipped_not_fatal(tiny_model_dir, tmp_path, monkeypatch):
    from rlctl_plugins.rewards import ExactAnswerReward
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(ExactAnswerReward, "score", lambda self, r: torch.ones(len(r)))  # every group uniform
    extra = "drop_uniform_groups = true\nmax_sampling_rounds = 2\n"
    trainer, summary, rows = run(tmp_path, grpo_recipe(tiny_model_dir, steps=2, extra=extra))
    steps = [r for r in rows if "eval" not in r]
    assert [r["no_signal"] for r in steps] == [1.0, 1.0] and steps[0]["sampling_rounds"] == 2
    assert summary["steps"] == 2 and (tmp_path / "run" / "final").exists()
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for p, q in zip(trainer.policy_model.parameters(), before.parameters()):
        torch.testing.assert_close(p, q)
