"""Asynchronous rollouts: a real worker process samples ahead of the learner (tiny model).

Checked: max_staleness = 0 is the synchronous run bit for bit; the staleness bound holds every step and
the worker does run ahead; every prompt is learned from exactly once across an interruption, a learner
that dies, and a worker that is killed; what cannot run asynchronously fails with one line.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest
import torch

from conftest import grpo_recipe, write_recipe
from rlctl import hookimpl, plugins
from rlctl.errors import RlctlError
from rlctl.metrics import TIMING_FIELDS, read_metrics
from rlctl.recipe import load_recipe
from rlctl.train.checkpoint import list_checkpoints
from rlctl.trainer import Interrupted, Trainer

pytestmark = pytest.mark.slow

STEPS = 6


class LearnedPrompts:
    """Records, per step, the prompts the learner learned from (a resumed step overwrites its record)."""

    def __init__(self, die_at: int | None = None, kill_worker_at: int | None = None, interrupt_at: int | None = None):
        self.by_step: dict[int, list[str]] = {}
        self.die_at, self.kill_worker_at, self.interrupt_at = die_at, kill_worker_at, interrupt_at
        self.metrics: list[dict] = []

    @hookimpl
    def rlctl_on_step_end(self, state, metrics):
        step = metrics["step"]
        self.by_step[step] = sorted(set(state.rollouts.prompts))
        self.answers = getattr(self, "answers", []) + [i["answer"] for i in state.rollouts.info]
        self.metrics.append(dict(metrics))
        if step == self.kill_worker_at:
            workers = [p for p in multiprocessing.active_children() if p.name == "rlctl-rollout-worker"]
            assert workers, "no rollout worker process is running"
            for p in workers:
                os.kill(p.pid, signal.SIGKILL)
            self.kill_worker_at = None
        if step == self.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        if step == self.die_at:
            self.die_at = None
            raise SystemExit("the learner dies")

    def all_prompts(self) -> list[str]:
        return sorted(p for step in sorted(self.by_step) for p in self.by_step[step])


@pytest.fixture
def observe():
    added = []

    def add(plugin):
        plugins.registry().manager.register(plugin)
        added.append(plugin)
        return plugin

    yield add
    for plugin in added:
        plugins.registry().manager.unregister(plugin)


def recipe(tmp_path, model_dir, staleness, extra="", name="r.toml"):
    train = f"max_staleness = {staleness}\nsave_every = 2\nkeep_checkpoints = 5\n{extra}"
    return load_recipe(write_recipe(tmp_path, grpo_recipe(model_dir, steps=STEPS, extra=train), name))


@pytest.fixture
def varied_reward(monkeypatch):
    """Rewards that differ within groups (the tiny model never answers right): the policy changes."""
    from rlctl_plugins.rewards import ExactAnswerReward

    monkeypatch.setattr(ExactAnswerReward, "score", lambda self, rollouts: torch.tensor(
        [float(len(set(text)) % 3) for text in rollouts.completions]))


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def test_max_staleness_zero_is_the_synchronous_run_bit_for_bit(tmp_path, tiny_model_dir, varied_reward):
    plain = Trainer(load_recipe(write_recipe(tmp_path, grpo_recipe(tiny_model_dir, steps=3), "a.toml")),
                    output_dir=tmp_path / "a", show_progress=False)
    plain.run()
    zero = Trainer(load_recipe(write_recipe(tmp_path, grpo_recipe(tiny_model_dir, steps=3,
                                                                   extra="max_staleness = 0"), "b.toml")),
                   output_dir=tmp_path / "b", show_progress=False)
    zero.run()
    assert comparable(read_metrics(tmp_path / "a" / "metrics.jsonl")) == \
        comparable(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    for (name, p), q in zip(plain.policy_model.named_parameters(), zero.policy_model.parameters()):
        assert torch.equal(p, q), name
    assert "staleness" not in read_metrics(tmp_path / "b" / "metrics.jsonl")[0]


@pytest.mark.parametrize("k", [1, 2])
def test_staleness_is_bounded_and_the_worker_runs_ahead(tmp_path, tiny_model_dir, observe, varied_reward, k):
    seen = observe(LearnedPrompts())
    Trainer(recipe(tmp_path, tiny_model_dir, k), output_dir=tmp_path / "run", show_progress=False).run()
    rows = [m for m in seen.metrics]
    assert len(rows) == STEPS
    for m in rows:
        assert m["staleness_max"] <= k
        assert sum(m[f"staleness_{a}"] for a in range(k + 1)) == m["samples"] == 16  # the histogram
        assert 0 <= m["learner_idle_frac"] <= 1 and 0 <= m["worker_idle_frac"] <= 1
    # the first batch is sampled by the initial weights for step 0; later ones by older weights than
    # the learner's: the worker really samples ahead
    assert rows[0]["staleness_max"] == 0
    assert max(m["staleness_max"] for m in rows) >= 1
    # behaviour log-probs come from the worker; after an update they differ from the learner's
    assert all("parity_logp_mean_abs" in m for m in rows)
    assert max(m["parity_logp_mean_abs"] for m in rows if m["staleness_max"] > 0) > 1e-4
    # every prompt of the uninterrupted synchronous data order is learned from, once
    sync = observe(LearnedPrompts())
    Trainer(recipe(tmp_path, tiny_model_dir, 0, name="s.toml"), output_dir=tmp_path / "sync",
            show_progress=False).run()
    assert seen.all_prompts() == sync.all_prompts()


def test_interrupted_and_resumed_learns_every_prompt_exactly_once(tmp_path, tiny_model_dir, observe, varied_reward):
    whole = observe(LearnedPrompts())
    Trainer(recipe(tmp_path, tiny_model_dir, 2), output_dir=tmp_path / "whole", show_progress=False).run()

    broken = observe(LearnedPrompts(interrupt_at=2))
    with pytest.raises(Interrupted):
        Trainer(recipe(tmp_path, tiny_model_dir, 2), output_dir=tmp_path / "cut", show_progress=False).run()
    saved = torch.load(list_checkpoints(tmp_path / "cut")[-1] / "rollouts.pt", weights_only=True)
    # steps 3, 4 and 5 were asked for (k + 1 in flight), not learned from; their prompts are in the file
    assert [r["index"] for r in saved["requests"]] == [3, 4, 5]
    assert [r["min_version"] for r in saved["requests"]] == [1, 2, 3]
    assert {r["index"] for r in saved["results"]} <= {r["index"] for r in saved["requests"]}
    Trainer(recipe(tmp_path, tiny_model_dir, 2), output_dir=tmp_path / "cut", show_progress=False,
            resume="latest").run()
    assert sorted(broken.by_step) == list(range(STEPS))
    assert broken.by_step == whole.by_step  # the same prompts at the same steps
    assert all(m["staleness_max"] <= 2 for m in broken.metrics)


def test_learner_that_dies_resumes_from_its_checkpoint_with_nothing_lost(tmp_path, tiny_model_dir, observe, varied_reward):
    whole = observe(LearnedPrompts())
    Trainer(recipe(tmp_path, tiny_model_dir, 1), output_dir=tmp_path / "whole", show_progress=False).run()
    died = observe(LearnedPrompts(die_at=3))  # after step 3 is learned, before its checkpoint: lost
    with pytest.raises(SystemExit):
        Trainer(recipe(tmp_path, tiny_model_dir, 1), output_dir=tmp_path / "died", show_progress=False).run()
    assert list_checkpoints(tmp_path / "died")[-1].name == "step-000002"
    assert not [p for p in multiprocessing.active_children() if p.name == "rlctl-rollout-worker"]
    Trainer(recipe(tmp_path, tiny_model_dir, 1), output_dir=tmp_path / "died", show_progress=False,
            resume="latest").run()
    assert died.by_step == whole.by_step  # steps 2 and 3 learned again from the same prompts
    assert died.all_prompts() == whole.all_prompts()


def test_killed_worker_is_restarted_and_its_batches_sampled_again(tmp_path, tiny_model_dir, observe, varied_reward):
    whole = observe(LearnedPrompts())
    Trainer(recipe(tmp_path, tiny_model_dir, 2), output_dir=tmp_path / "whole", show_progress=False).run()
    killed = observe(LearnedPrompts(kill_worker_at=1))
    trainer = Trainer(recipe(tmp_path, tiny_model_dir, 2), output_dir=tmp_path / "killed", show_progress=False)
    said = []
    trainer.view.message = said.append
    trainer.run()
    assert any("rollout worker died" in m and "restarted" in m for m in said), said
    assert killed.by_step == whole.by_step
    assert all(m["staleness_max"] <= 2 for m in killed.metrics)


def test_what_cannot_run_asynchronously_fails_with_one_line(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from rlctl.cli import cli
    from rlctl.recipe import Stage
    from rlctl.train.async_source import check_async_stage

    path = write_recipe(tmp_path, grpo_recipe(tiny_model_dir, extra="max_staleness = -1"))
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "max_staleness = -1: must be >= 0" in result.output

    stage = recipe(tmp_path, tiny_model_dir, 1).stages[0]
    with pytest.raises(RlctlError, match="with 2 processes: asynchronous rollouts run with one learner"):
        check_async_stage(stage, object(), num_processes=2)

    class Selecting:
        candidates_per_prompt = 2

    with pytest.raises(RlctlError, match="chooses prompts from the rewards it observed"):
        check_async_stage(stage, Selecting(), num_processes=1)
    class InProcessOnly:
        runs_in_worker = False

    with pytest.raises(RlctlError, match="cannot run in the rollout worker process"):
        check_async_stage(stage, InProcessOnly(), num_processes=1)
    assert isinstance(stage, Stage)


def test_dynamic_sampling_takes_extra_batches_from_the_worker_within_the_bound(tmp_path, tiny_model_dir,
                                                                                observe, monkeypatch):
    from rlctl_plugins.rewards import ExactAnswerReward

    # groups of even answers all score 0 (dropped); the others vary with the text
    monkeypatch.setattr(ExactAnswerReward, "score", lambda self, rollouts: torch.tensor(
        [float(len(set(t)) % 3 + 1) * (int(i["answer"]) % 2) for t, i in zip(rollouts.completions, rollouts.info)]))
    seen = observe(LearnedPrompts())
    Trainer(recipe(tmp_path, tiny_model_dir, 1, extra="drop_uniform_groups = true\nmax_sampling_rounds = 4"),
            output_dir=tmp_path / "run", show_progress=False).run()
    assert len(seen.metrics) == STEPS
    assert all(m["staleness_max"] <= 1 for m in seen.metrics)
    assert any(m.get("sampling_rounds", 1) > 1 for m in seen.metrics)  # some step took extra batches
    assert all(m["samples"] <= 16 for m in seen.metrics)  # never more groups than prompts_per_step
    assert all(int(a) % 2 for a in seen.answers), "a group that was dropped was learned from"
