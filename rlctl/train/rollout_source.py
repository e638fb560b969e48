"""The rollout source: the one place that turns prompts into scored ``Rollouts``.

Each process draws the same global batch of prompts, samples its shard with the stage's sampler, scores
it and tags it with the policy version that produced it (the number of optimizer steps taken so far).
With dynamic sampling (``drop_uniform_groups``) groups whose rewards are all equal are dropped and the
source samples again, up to ``max_sampling_rounds``. ``RolloutSource`` is synchronous: the policy that
samples is the one being trained; ``AsyncRolloutSource`` (``async_source.py``) takes its rounds from a
worker process that samples ahead of the learner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlctl.data import PromptStream, load_prompts
from rlctl.models import Policy
from rlctl.recipe import ComponentSpec, Stage
from rlctl.rollouts import Rollouts
from rlctl.train.components import guarded
from rlctl.train.engine import Engine, gather_rollouts, shard
from rlctl.train.scorer import Scorer


@dataclass
class Batch:
    rollouts: Rollouts
    reward_stats: dict[str, float]  # of the first round, before any group was dropped
    rounds: int  # sampling rounds taken
    informative: bool  # False when every group was uniform in every round: nothing to learn from
    metrics: dict[str, float] = field(default_factory=dict)  # the source's own (asynchronous: staleness ...)


class RolloutSource:
    """Synchronous: each round draws prompts and samples them with the policy being trained."""

    asynchronous = False

    def __init__(self, engine: Engine, scorer: Scorer, pad_token_id: int, policy_version: Callable[[], int]):
        self.engine = engine
        self.scorer = scorer
        self.pad_token_id = pad_token_id
        self.policy_version = policy_version

    def collect(self, policy: Policy, stream: PromptStream, stage: Stage, built: dict[str, Any],
                specs: dict[str, Any], need_rewards: bool) -> Batch:
        """Sample (and score) a batch; with ``drop_uniform_groups``, keep refilling up to the batch size."""
        t = stage.train
        kept: list[Rollouts] = []
        first_stats: dict[str, float] = {}
        wanted = t.prompts_per_step // self.engine.num_processes  # groups this process contributes
        groups_kept, rounds, next_group = 0, 0, 0
        while rounds < t.max_sampling_rounds and groups_kept < wanted:
            batch, drawn = self.sample_round(policy, stream, stage, built, specs)
            batch.group_ids = batch.group_ids + next_group  # globally unique group ids
            next_group += drawn
            if need_rewards:
                batch.rewards, stats = self.scorer.score(batch, built["reward"], specs["reward"])
                if rounds == 0:
                    first_stats = stats  # metrics describe what the policy produced, before filtering
                self._observe(built["sampler"], specs["sampler"], batch)
            rounds += 1
            last = batch
            if t.drop_uniform_groups and batch.rewards is not None:
                batch = drop_uniform_groups(batch)
                if len(batch) == 0:
                    continue
            kept.append(batch)
            groups_kept += int(torch.unique(batch.group_ids).numel())
            if not t.drop_uniform_groups:
                break
        if not kept:
            return Batch(last, first_stats, rounds, informative=False)
        rollouts = Rollouts.concat(kept, pad_token_id=self.pad_token_id)
        if t.drop_uniform_groups:
            rollouts = first_groups(rollouts, wanted)
        return Batch(rollouts, first_stats, rounds, informative=True)

    def sample_round(self, policy: Policy, stream: PromptStream, stage: Stage, built: dict[str, Any],
                     specs: dict[str, Any]) -> tuple[Rollouts, int]:
        """One round: this process's rollouts (group ids offset to its shard) and the prompts drawn in all."""
        t, engine = stage.train, self.engine
        # a prompt-selecting sampler sees more candidates than it keeps (``candidates_per_prompt``)
        oversample = int(getattr(built["sampler"], "candidates_per_prompt", 1) or 1)
        prompts = stream.next_batch(t.prompts_per_step * oversample)
        local, offset = shard(prompts, engine.process_index, engine.num_processes)
        batch = guarded(specs["sampler"], "sampler", built["sampler"].sample, policy, local, t.group_size)
        batch.group_ids = batch.group_ids + offset
        batch.policy_version = self.policy_version()
        return batch, len(prompts)

    def after_update(self, model: torch.nn.Module, version: int) -> None:
        """The learner finished a step: ``version`` training steps are in ``model`` (nothing to do here)."""

    def state_dict(self) -> dict[str, Any] | None:
        """What a checkpoint must keep of this source beyond the data position (nothing, synchronous)."""
        return None

    def close(self) -> None:
        pass

    def _observe(self, sampler: Any, spec: ComponentSpec, batch: Rollouts) -> None:
        """Show a sampler every scored batch of all processes (before dynamic-sampling filters)."""
        observe = getattr(sampler, "observe", None)
        if observe is None:
            return
        if self.engine.num_processes > 1:  # every process keeps the same statistics
            batch, _ = gather_rollouts(self.engine, batch, self.pad_token_id)
        guarded(spec, "sampler", observe, batch)


class PromptSources:
    """The prompts of each data table a run uses (the recipe's, and a stage's own), loaded once; each
    keeps its own position, so a stage that returns to a source continues where it left off."""

    def __init__(self, seed: int, num_eval: int):
        self.seed, self.num_eval = seed, num_eval
        self.sources: dict[str, tuple[PromptStream, list]] = {}  # data table (as JSON) -> (stream, eval prompts)

    def use(self, data: dict[str, Any]) -> tuple[PromptStream, list]:
        key = json.dumps(data, sort_keys=True)
        if key not in self.sources:
            train_prompts, eval_prompts = load_prompts(data)
            self.sources[key] = (PromptStream(train_prompts, self.seed), eval_prompts[: self.num_eval])
        return self.sources[key]

    def __getitem__(self, key: str) -> tuple[PromptStream, list]:
        return self.sources[key]

    def __iter__(self) -> Any:
        return iter(self.sources)


def drop_uniform_groups(rollouts: Rollouts) -> Rollouts:
    """Keep only groups whose rewards are not all equal (they carry no group-relative signal)."""
    r = rollouts.rewards if rollouts.rewards.dim() == 1 else rollouts.rewards.sum(1)
    keep = []
    for g in torch.unique(rollouts.group_ids):
        idx = (rollouts.group_ids == g).nonzero().flatten()
        if r[idx].max() > r[idx].min():
            keep.append(idx)
    if not keep:
        return rollouts.select(torch.zeros(0, dtype=torch.long))
    return rollouts.select(torch.cat(keep))


def first_groups(rollouts: Rollouts, k: int) -> Rollouts:
    groups = torch.unique(rollouts.group_ids, sorted=True)[:k]
    return rollouts.select(torch.isin(rollouts.group_ids, groups).nonzero().flatten())
