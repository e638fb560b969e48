"""Exact resume, clean interruption, numerical and reward faults."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from conftest import grpo_recipe, write_recipe
from rlctl import hookimpl, plugins
from rlctl.train.checkpoint import list_checkpoints
from rlctl.errors import ComponentError, RlctlError
from rlctl.metrics import TIMING_FIELDS, read_metrics
from rlctl.recipe import load_recipe
from rlctl.trainer import Interrupted, Trainer

pytestmark = pytest.mark.slow

TWO_STAGES = """
[[stage]]
name = "warmup"
steps = 2
sampler = {{ use = "demonstrations" }}
loss = {{ use = "sft" }}
train = {{ lr = 5e-3 }}

[[stage]]
name = "rl"
steps = 4
loss = {{ use = "ppo_clip", kl_coef = 0.05 }}
train = {{ ppo_epochs = 2, mini_batches = 2 }}
"""


def text_dependent_reward(self, rollouts):
    return torch.tensor([float(len(set(text)) % 3) for text in rollouts.completions])


@pytest.fixture
def varied_reward(monkeypatch):
    from rlctl_plugins.rewards import ExactAnswerReward

    monkeypatch.setattr(ExactAnswerReward, "score", text_dependent_reward)


class InterruptAt:
    """Sends SIGINT to this process at the end of the given step (the real Ctrl-C path)."""

    def __init__(self, step: int, times: int = 1):
        self.step, self.times = step, times

    @hookimpl
    def rlctl_on_step_end(self, state, metrics):
        if metrics["step"] == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def observer():
    registered = []

    def add(plugin):
        plugins.registry().manager.register(plugin)
        registered.append(plugin)

    yield add
    for plugin in registered:
        plugins.registry().manager.unregister(plugin)


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def recipe_text(model_dir, extra_train=""):
    return grpo_recipe(model_dir, extra=f"save_every = 1\nkeep_checkpoints = 2\n{extra_train}").replace(
        "steps = 3\n", "") + TWO_STAGES.format()


def test_interrupted_and_resumed_run_matches_uninterrupted(tiny_model_dir, tmp_path, varied_reward, observer):
    path = write_recipe(tmp_path, recipe_text(tiny_model_dir))
    Trainer(load_recipe(path), output_dir=tmp_path / "full", show_progress=False).run()
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")

    observer(InterruptAt(step=3))  # mid-way through the RL stage (reference model, optimizer state, RNG)
    with pytest.raises(Interrupted) as info:
        Trainer(load_recipe(path), output_dir=tmp_path / "cut", show_progress=False).run()
    assert "--resume latest" in str(info.value) and info.value.exit_code == 130
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-000003", "step-000004"]
    # the resumed run starts at step 4, so the interrupting observer does not fire again
    Trainer(load_recipe(path), output_dir=tmp_path / "cut", show_progress=False, resume="latest").run()
    resumed = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert len([r for r in full if "eval" not in r]) == 6
    assert comparable(resumed) == comparable(full)
    assert len(list_checkpoints(tmp_path / "cut")) == 2  # only the newest K are kept


def test_second_interrupt_stops_at_once(tiny_model_dir, tmp_path, observer):
    observer(InterruptAt(step=0, times=2))
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_recipe(write_recipe(tmp_path, grpo_recipe(tiny_model_dir, steps=3))),
                output_dir=tmp_path / "run", show_progress=False).run()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_non_finite_loss_skips_updates_then_aborts_with_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from rlctl_plugins.policy_loss import ClippedPolicyLoss

    def nan_loss(self, rollouts, logprobs, **extra):
        return logprobs.sum() * float("nan"), {}

    monkeypatch.setattr(ClippedPolicyLoss, "compute", nan_loss)
    path = write_recipe(tmp_path, grpo_recipe(tiny_model_dir, steps=5, extra="max_bad_steps = 2\n"))
    trainer = Trainer(load_recipe(path), output_dir=tmp_path / "run", show_progress=False)
    with pytest.raises(RlctlError, match=r"aborting: 2 consecutive steps with a non-finite loss"):
        trainer.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped_updates"] for r in rows] == [1.0, 1.0]
    (ckpt,) = list_checkpoints(tmp_path / "run")
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(ckpt / "policy")
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for p, q in zip(saved.parameters(), original.parameters()):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, q)  # skipped updates never touched the weights


def test_reward_failure_on_some_samples_scores_zero_and_counts(tiny_model_dir, tmp_path, monkeypatch):
    from rlctl_plugins.rewards import ExactAnswerReward

    def flaky(self, rollouts):  # fails on the 4 completions of the first prompt, 1.0 elsewhere
        if (rollouts.group_ids == 0).any():
            raise ValueError("bad sample")
        return torch.ones(len(rollouts))

    monkeypatch.setattr(ExactAnswerReward, "score", flaky)
    path = write_recipe(tmp_path, grpo_recipe(tiny_model_dir, steps=1))
    Trainer(load_recipe(path), output_dir=tmp_path / "run", show_progress=False).run()
    row = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert row["reward/exact/failed"] == 4.0
    assert row["reward/exact"] == pytest.approx(12 / 16)


def test_reward_failing_everywhere_stops_naming_the_plugin(tiny_model_dir, tmp_path, monkeypatch):
    from rlctl_plugins.rewards import ExactAnswerReward

    def broken(self, rollouts):
        raise KeyError("answer")

    monkeypatch.setattr(ExactAnswerReward, "score", broken)
    with pytest.raises(ComponentError) as info:
        Trainer(load_recipe(write_recipe(tmp_path, grpo_recipe(tiny_model_dir, steps=1))),
                output_dir=tmp_path / "run", show_progress=False).run()
    msg = str(info.value)
    assert "reward 'exact' (plugin rlctl_plugins.rewards, recipe section [reward[0]])" in msg
    assert "failed on 16 of 16 completions" in msg and "max_reward_failure_rate = 0.5" in msg
