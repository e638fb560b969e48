"""The scorer: a recipe's ``[[reward]]`` components applied to a batch, weighted and summed, with fault
tolerance (a reward that raises is retried sample by sample; failed samples score 0 up to
``[train] max_reward_failure_rate``) and per-reward metrics."""

from __future__ import annotations

from typing import Any, Callable

import torch

from rlctl.errors import ComponentError
from rlctl.recipe import ComponentSpec
from rlctl.rollouts import Rollouts
from rlctl.train.components import guarded, plugin_of

ACCURACY_THRESHOLD = 1.0  # a completion is "correct" when the first reward scores at least this


class Scorer:
    def __init__(self, max_failure_rate: float, warn: Callable[[str], None]):
        self.max_failure_rate = max_failure_rate
        self.warn = warn

    def score(self, rollouts: Rollouts, rewards: list[Any],
              specs: list[ComponentSpec]) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted sum of the rewards ``[N]`` (or ``[N, T]`` for process rewards) and metrics:
        ``reward``, ``reward_std``, ``accuracy`` (of the first reward) and ``reward/<name>`` per reward."""
        total = None
        stats: dict[str, float] = {}
        # rollouts the sampler marked failed (an environment that crashed) score 0 whatever they say
        broken = [i for i, info in enumerate(rollouts.info) if info.get("failed")]
        for i, (reward, spec) in enumerate(zip(rewards, specs)):
            value, failed = self.score_one(reward, spec, rollouts)
            if broken and value.shape[0] == len(rollouts):
                value = value.clone()
                value[broken] = 0.0
            if failed:
                stats[f"reward/{spec.name}/failed"] = float(failed)
            if value.shape[0] != len(rollouts):
                raise ComponentError(f"[{spec.section}] use = {spec.use!r}: score() returned {value.shape[0]} "
                                     f"values for {len(rollouts)} completions")
            per_sample = value if value.dim() == 1 else value.sum(dim=1)
            stats[f"reward/{spec.name}"] = float(per_sample.mean().item())
            for key, count in (getattr(reward, "last_stats", None) or {}).items():
                stats[f"reward/{spec.name}/{key}"] = float(count)  # e.g. timeouts of a code sandbox
            if i == 0:
                stats["accuracy"] = float((per_sample >= ACCURACY_THRESHOLD).float().mean().item())
            weighted = spec.weight * value
            if total is None:
                total = weighted
            elif total.dim() != weighted.dim():  # mix of outcome and process rewards: put outcome on last token
                raise ComponentError(f"[{spec.section}]: cannot add a per-token reward to a per-completion "
                                     "reward; use one kind in a recipe")
            else:
                total = total + weighted
        if total is None:
            total = torch.zeros(len(rollouts))
        per_completion = total if total.dim() == 1 else total.sum(1)
        stats["reward"] = float(per_completion.mean().item())
        if broken:
            stats["failed_rollouts"] = float(len(broken))
        stats["reward_std"] = float(per_completion.std(unbiased=False).item())
        return total, stats

    def score_one(self, reward: Any, spec: ComponentSpec, rollouts: Rollouts) -> tuple[torch.Tensor, int]:
        """Score a batch; if the reward raises, score sample by sample and give failed samples 0."""
        try:
            return guarded(spec, "reward", reward.score, rollouts).float().cpu(), 0
        except ComponentError as batch_error:
            scores, failed, last_error = [], 0, batch_error
            for i in range(len(rollouts)):
                try:
                    scores.append(reward.score(rollouts.select([i])).float().cpu().reshape(-1)[0])
                except Exception as exc:
                    scores.append(torch.tensor(0.0))
                    failed, last_error = failed + 1, exc
            limit = self.max_failure_rate
            if failed > limit * len(rollouts):
                raise ComponentError(f"reward {spec.use!r} (plugin {plugin_of('reward', spec)}, recipe section "
                                     f"[{spec.section}]) failed on {failed} of {len(rollouts)} completions, above "
                                     f"[train] max_reward_failure_rate = {limit}; last error: "
                                     f"{type(last_error).__name__}: {last_error}") from batch_error
            self.warn(f"warning: reward {spec.use!r} failed on {failed} completion(s), scored 0: "
                      f"{type(last_error).__name__}: {last_error}")
            return torch.stack(scores), failed
