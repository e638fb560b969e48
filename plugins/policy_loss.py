"""Clipped policy-gradient surrogate (PPO / GRPO / DAPO clip-higher) with optional KL and entropy terms."""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.ops import AGGREGATIONS, aggregate, kl_penalty, masked_mean
from rlctl.rollouts import Rollouts


class ClippedPolicyLoss:
    """-min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A) per token, aggregated.

    ``kl_coef`` > 0 adds ``kl_coef * KL(pi || pi_ref)`` per token (needs a reference model);
    ``entropy_coef`` > 0 rewards entropy (a bonus), < 0 penalises it.
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float | None = None,
                 aggregation: str = "token-mean", normalizer: float | None = None,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation = {aggregation!r}: accepted values are {', '.join(AGGREGATIONS)}")
        if aggregation == "constant" and not normalizer:
            raise ValueError("aggregation = 'constant' needs normalizer (e.g. max_new_tokens)")
        if clip_low < 0 or (clip_high is not None and clip_high < 0):
            raise ValueError("clip_low and clip_high must be >= 0")
        if kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_estimator = {kl_estimator!r}: accepted values are k1, k2, k3")
        self.clip_low = clip_low
        self.clip_high = clip_low if clip_high is None else clip_high
        self.aggregation = aggregation
        self.normalizer = normalizer
        self.kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.entropy_coef = entropy_coef

    @property
    def requires(self) -> tuple[str, ...]:
        needs = ["advantages", "old_logprobs"]
        if self.kl_coef:
            needs.append("ref_logprobs")
        if self.entropy_coef:
            needs.append("entropy")
        return tuple(needs)

    def compute(self, rollouts: Rollouts, logprobs: torch.Tensor, entropy: torch.Tensor | None = None,
                **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        mask = rollouts.loss_mask if rollouts.loss_mask is not None else rollouts.completion_mask
        adv = rollouts.advantages
        ratio = torch.exp(logprobs - rollouts.old_logprobs)
        unclipped = ratio * adv
        clipped = torch.clamp(ratio, 1 - self.clip_low, 1 + self.clip_high) * adv
        per_token = -torch.minimum(unclipped, clipped)
        stats = {
            "clip_frac": masked_mean((clipped < unclipped).float(), mask).item(),
            "ratio_mean": masked_mean(ratio.detach(), mask).item(),
        }
        if self.kl_coef:
            kl = kl_penalty(logprobs, rollouts.ref_logprobs, self.kl_estimator)
            per_token = per_token + self.kl_coef * kl
            stats["kl"] = masked_mean(kl.detach(), mask).item()
        if self.entropy_coef:
            per_token = per_token - self.entropy_coef * entropy
            stats["entropy"] = masked_mean(entropy.detach(), mask).item()
        loss = aggregate(per_token, mask, self.aggregation, self.normalizer)
        return loss, stats


@hookimpl
def rlctl_register_losses(register):
    register("ppo_clip", ClippedPolicyLoss)
