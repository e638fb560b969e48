"""Each part of the training pipeline (``rlctl.train``) run alone, with fakes of its neighbours."""

from __future__ import annotations

import os
import signal
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from rlctl import testing
from rlctl.errors import ComponentError, RlctlError
from rlctl.recipe import ComponentSpec
from rlctl.rollouts import Prompt
from rlctl.train.checkpointer import truncate_metrics
from rlctl.train.learner import BadSteps, Learner, group_batches, micro_batches
from rlctl.train.rollout_source import RolloutSource, drop_uniform_groups
from rlctl.train.scorer import Scorer
from rlctl.train.signals import StopRequest


class FakeEngine:
    """One process on the CPU, no wrapper: what the parts ask of an engine."""

    num_processes, process_index, is_main, device = 1, 0, True, torch.device("cpu")

    def unwrap(self, model):
        return model

    def prepare_optimizer(self, optimizer):
        return optimizer

    def autocast(self):
        return nullcontext()

    def no_sync(self, model):
        return nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm(self, params, max_norm):
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))

    def sum_counts(self, counts):
        return counts

    def all_true(self, flag):
        return flag

    def gather_objects(self, value):
        return [value]


def spec(use: str, weight: float = 1.0, section: str = "reward[0]") -> ComponentSpec:
    return ComponentSpec(section=section, use=use, options={}, weight=weight, name=use)


# ------------------------------------------------------------------------------------- scorer
class ConstantReward:
    def __init__(self, value):
        self.value = value

    def score(self, rollouts):
        return torch.full((len(rollouts),), float(self.value))


class FailsOnSecondRow:
    def score(self, rollouts):
        if any(c == "boom" for c in rollouts.completions):
            raise RuntimeError("cannot parse")
        return torch.ones(len(rollouts))


def test_scorer_weights_rewards_and_names_them():
    warnings: list[str] = []
    batch = testing.fake_rollouts(num_samples=4)
    total, stats = Scorer(0.5, warnings.append).score(
        batch, [ConstantReward(1.0), ConstantReward(0.5)], [spec("a", 1.0), spec("b", 0.2, "reward[1]")])
    assert total.tolist() == pytest.approx([1.1] * 4)  # 1 * 1.0 + 0.2 * 0.5
    assert stats["reward/a"] == 1.0 and stats["reward/b"] == 0.5 and stats["accuracy"] == 1.0
    assert stats["reward"] == pytest.approx(1.1) and stats["reward_std"] == 0.0 and not warnings


def test_scorer_scores_failed_samples_zero_up_to_the_limit():
    warnings: list[str] = []
    batch = testing.fake_rollouts(completions=["ok", "boom", "ok", "ok"])
    total, stats = Scorer(0.5, warnings.append).score(batch, [FailsOnSecondRow()], [spec("parse")])
    assert total.tolist() == [1.0, 0.0, 1.0, 1.0] and stats["reward/parse/failed"] == 1.0
    assert "failed on 1 completion(s)" in warnings[0]
    with pytest.raises(ComponentError, match="failed on 1 of 4 completions, above"):
        Scorer(0.0, warnings.append).score(batch, [FailsOnSecondRow()], [spec("parse")])


# ----------------------------------------------------------------------------- rollout source
class FakeStream:
    def __init__(self):
        self.drawn = 0

    def next_batch(self, n):
        self.drawn += n
        return [Prompt(f"p{self.drawn - n + i}", answer="1") for i in range(n)]


class AlternatingSampler:
    """Round 1: group 0 uniform, group 1 mixed; later rounds: mixed groups."""

    def __init__(self):
        self.calls, self.observed = 0, []

    def sample(self, policy, prompts, group_size):
        self.calls += 1
        rewards = [1, 1, 1, 0] if self.calls == 1 else [1, 0] * len(prompts)
        return testing.fake_rollouts(info=[{"r": r} for r in rewards[: len(prompts) * group_size]],
                                     group_size=group_size)

    def observe(self, rollouts):
        self.observed.append(len(rollouts))


class RewardFromInfo:
    def score(self, rollouts):
        return torch.tensor([float(i["r"]) for i in rollouts.info])


def test_rollout_source_refills_dropped_groups_and_tags_the_policy_version():
    sampler = AlternatingSampler()
    source = RolloutSource(FakeEngine(), Scorer(0.5, print), pad_token_id=0, policy_version=lambda: 7)
    train = SimpleNamespace(prompts_per_step=2, group_size=2, max_sampling_rounds=3, drop_uniform_groups=True)
    stage = SimpleNamespace(train=train)
    built = {"sampler": sampler, "reward": [RewardFromInfo()]}
    specs = {"sampler": spec("alt", section="sampler"), "reward": [spec("r")]}
    batch = source.collect(None, FakeStream(), stage, built, specs, need_rewards=True)
    assert batch.informative and batch.rounds == 2 and sampler.calls == 2
    assert batch.reward_stats["reward"] == 0.75  # the first round, before the uniform group was dropped
    assert len(torch.unique(batch.rollouts.group_ids)) == 2  # refilled to prompts_per_step groups
    assert batch.rollouts.policy_version == 7 and sampler.observed == [4, 4]


def test_drop_uniform_groups_keeps_groups_with_signal():
    batch = testing.fake_rollouts(rewards=[1, 1, 0, 1, 0, 0], group_size=2)
    assert drop_uniform_groups(batch).group_ids.tolist() == [1, 1]


# -------------------------------------------------------------------------------------- learner
class RecordingLoss:
    """sum(-logprobs * mask) / totals["tokens"]; records what each micro-batch was given."""

    requires = ()

    def __init__(self):
        self.seen = []

    def compute(self, rollouts, logprobs, **extra):
        self.seen.append((len(rollouts), dict(rollouts.totals)))
        mask = rollouts.completion_mask.float()
        return (-(logprobs * mask)).sum() / rollouts.totals["tokens"], {"rows": float(len(rollouts))}


def test_learner_gives_every_micro_batch_the_whole_batch_counts(tiny_policy):
    model = tiny_policy.model
    learner = Learner(FakeEngine(), model, reference=None, pad_token_id=0, seed=0)
    learner.new_optimizer(SimpleNamespace(train=SimpleNamespace(lr=0.0, adam_betas=[0.9, 0.999], weight_decay=0.0)))
    batch = testing.fake_rollouts(num_samples=6, group_size=2, lengths=[1, 2, 3, 4, 5, 6], vocab_size=60)
    loss = RecordingLoss()
    t = SimpleNamespace(ppo_epochs=1, mini_batches=1, micro_batch_size=2, max_grad_norm=0.0)
    stats = learner.update(batch, loss, spec("rec", section="loss"), set(), t, on_policy_single_pass=True)
    assert [rows for rows, _ in loss.seen] == [2, 2, 2]
    assert all(totals == {"tokens": 21.0, "sequences": 6.0} for _, totals in loss.seen)
    with torch.no_grad():
        whole = -(learner.forward(batch, grad=False).logprobs * batch.completion_mask).sum() / 21
    assert stats["loss"] == pytest.approx(float(whole), rel=1e-5)  # the shares add up to the whole loss
    assert stats["rows"] == 2.0 and learner.version == 1 and stats["grad_norm"] > 0


def test_batches_keep_groups_whole():
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    assert [b.tolist() for b in micro_batches(groups, 3)] == [[0, 1], [2, 3, 4], [5]]
    parts = group_batches(groups, 2, torch.Generator().manual_seed(0))
    assert sorted(i for p in parts for i in p.tolist()) == list(range(6))
    assert all(len(set(groups[p].tolist()) & set(groups[q].tolist())) == 0 for p in parts for q in parts if p is not q)


def test_bad_steps_count_in_a_row_and_abort_at_the_limit():
    warnings: list[str] = []
    bad = BadSteps(2, warnings.append)
    assert not bad.count({"step": 0, "skipped_updates": 1.0}) and bad.in_a_row == 1
    assert not bad.count({"step": 1}) and bad.in_a_row == 0  # a good step resets the count
    assert not bad.count({"step": 2, "skipped_updates": 1.0})
    assert bad.count({"step": 3, "skipped_updates": 1.0})
    assert isinstance(bad.abort("ckpt"), RlctlError) and "max_bad_steps = 2" in str(bad.abort("ckpt"))
    assert len(warnings) == 3


# ------------------------------------------------------------------------------ checkpoints, signals
def test_truncate_metrics_drops_what_a_resume_will_write_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "eval": "x"}\n{"step": 2}\n{"step": 3}\n')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n{"step": 2, "eval": "x"}\n'


def test_first_signal_requests_a_stop_the_second_interrupts():
    said: list[str] = []
    stop = StopRequest(said.append)
    restore = stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and "stopping after this step" in said[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        restore()
        signal.signal(signal.SIGINT, signal.default_int_handler)


# ------------------------------------------------------------------------------------- threads
def _fake_sysfs(root, cores_of_cpus):
    """A /sys/devices/system/cpu with CPU i on core ``cores_of_cpus[i]`` of package 0."""
    for cpu, core in enumerate(cores_of_cpus):
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    return str(root)


def test_threads_are_the_physical_cores_shared_by_local_processes(tmp_path, monkeypatch):
    """Hyper-threads of one core count once; local processes split the cores; OMP_NUM_THREADS caps;
    [train] threads overrides; without a topology every CPU counts."""
    from rlctl.train import engine

    monkeypatch.setattr(engine, "CPU_SYSFS", _fake_sysfs(tmp_path / "sys", [0, 0, 1, 1, 2, 2, 3, 3]))
    assert engine.physical_cores(set(range(8))) == 4
    assert engine.physical_cores({0, 1}) == 1  # two hyper-threads of one core
    assert engine.physical_cores({9, 10}) == 2  # no topology to read
    monkeypatch.setattr(engine, "physical_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert engine.pick_threads()[0] == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    threads, why = engine.pick_threads()
    assert threads == 2 and "2 processes" in why
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert engine.pick_threads() == (1, "OMP_NUM_THREADS")
    assert engine.pick_threads(3) == (3, "[train] threads")
    with pytest.raises(RlctlError, match=r"\[train\] threads = -1"):
        engine.pick_threads(-1)
