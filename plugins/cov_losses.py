"""Clip-Cov and KL-Cov ("The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models").

The paper shows that policy entropy falls in proportion to the covariance between a token's log-prob and
its advantage: confident tokens with high advantage drive entropy collapse. Both losses act on the few
tokens with the largest centred covariance

    cov_t = (A_t - mean A) * (log pi(y_t) - mean log pi)

(means over the loss's tokens of the batch the loss is given; no gradient through cov):

* ``clip_cov``: among tokens the PPO clip did not already clip and whose cov lies in (cov_low, cov_high),
  a random fraction ``clip_ratio`` of all tokens (at least one) is dropped from the loss (no gradient).
* ``kl_cov``: the unclipped surrogate -rho A on every token, plus ``kl_cov_coef * |log pi - log pi_old|``
  on the top ``kl_cov_ratio`` fraction of tokens by cov (at least one).

The selection runs on each micro-batch the loss is called with (as in verl); keep micro-batches large
enough that ``ratio * tokens`` is a few tokens.
"""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.ops import masked_mean
from rlctl.rollouts import Rollouts
from rlctl_plugins.policy_loss import ClippedPolicyLoss

PAPER = "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models"


def centred_covariance(advantages: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token (A - mean A)(log pi - mean log pi) over the masked tokens [N, T]; no gradient."""
    a, lp = advantages.detach().float(), logprobs.detach().float()
    return (a - masked_mean(a, mask)) * (lp - masked_mean(lp, mask))


def _check_fraction(key: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{key} = {value}: accepted values are in (0, 1]")


class ClipCovLoss(ClippedPolicyLoss):
    """Clip-Cov ("The Entropy Mechanism of RL for Reasoning LMs"): the ``ppo_clip`` surrogate, with a random
    ``clip_ratio`` fraction of tokens whose log-prob/advantage covariance lies in (cov_low, cov_high)
    dropped from the gradient.

    Defaults are the paper's (and verl's): ``clip_ratio = 2e-4``, ``cov_low = 1``, ``cov_high = 5``. Only
    tokens the PPO clip left alone are candidates. Logs ``cov_clip_frac`` (tokens dropped) and ``cov_mean``.
    Every ``ppo_clip`` key applies.
    """

    paper = PAPER

    def __init__(self, clip_ratio: float = 2e-4, cov_low: float = 1.0, cov_high: float = 5.0,
                 clip_low: float = 0.2, clip_high: float | None = None, aggregation: str = "token-mean",
                 normalizer: float | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 entropy_coef: float = 0.0, dual_clip: float = 0.0, tis_cap: float = 0.0,
                 tis_level: str = "token", mask_low: float = 0.0, mask_high: float = 0.0,
                 kl_target: float = 0.0, kl_horizon: float = 10000.0):
        _check_fraction("clip_ratio", clip_ratio)
        if cov_low >= cov_high:
            raise ValueError(f"cov_low = {cov_low}, cov_high = {cov_high}: accepted values have cov_low < cov_high")
        super().__init__(clip_low, clip_high, aggregation, normalizer, kl_coef, kl_estimator, entropy_coef,
                         dual_clip=dual_clip, tis_cap=tis_cap, tis_level=tis_level, mask_low=mask_low,
                         mask_high=mask_high, kl_target=kl_target, kl_horizon=kl_horizon)
        self.clip_ratio = clip_ratio
        self.cov_low = cov_low
        self.cov_high = cov_high

    def surrogate(self, rollouts: Rollouts, logprobs: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        per_token, stats = super().surrogate(rollouts, logprobs, mask)
        adv = rollouts.advantages
        ratio = torch.exp(logprobs - rollouts.old_logprobs).detach()
        clipped_by_ppo = -torch.clamp(ratio, 1 - self.clip_low, 1 + self.clip_high) * adv > -ratio * adv
        cov = centred_covariance(adv, logprobs, mask)
        valid = mask > 0
        candidates = (valid & ~clipped_by_ppo & (cov > self.cov_low) & (cov < self.cov_high)).nonzero()
        count = max(int(self.clip_ratio * valid.sum().item()), 1)
        keep = torch.ones_like(per_token)
        if len(candidates):
            chosen = candidates[torch.randperm(len(candidates))[:count].to(candidates.device)]
            keep[chosen[:, 0], chosen[:, 1]] = 0.0
        stats["cov_clip_frac"] = masked_mean(1.0 - keep, mask).item()
        stats["cov_mean"] = masked_mean(cov, mask).item()
        return per_token * keep, stats


class KLCovLoss(ClippedPolicyLoss):
    """KL-Cov ("The Entropy Mechanism of RL for Reasoning LMs"): -rho A on every token (no clip), plus
    ``kl_cov_coef * |log pi - log pi_old|`` on the top ``kl_cov_ratio`` fraction of tokens by log-prob /
    advantage covariance.

    Defaults: ``kl_cov_ratio = 2e-4`` (verl's; the paper tunes it per model, fractions of a percent) and
    ``kl_cov_coef = 1`` (the paper's). Logs ``cov_kl_frac`` and ``cov_mean``. KL-to-reference, entropy and
    behaviour-correction keys as ``ppo_clip``.
    """

    paper = PAPER

    def __init__(self, kl_cov_ratio: float = 2e-4, kl_cov_coef: float = 1.0, aggregation: str = "token-mean",
                 normalizer: float | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 entropy_coef: float = 0.0, tis_cap: float = 0.0, tis_level: str = "token",
                 mask_low: float = 0.0, mask_high: float = 0.0, kl_target: float = 0.0,
                 kl_horizon: float = 10000.0):
        _check_fraction("kl_cov_ratio", kl_cov_ratio)
        if kl_cov_coef < 0:
            raise ValueError(f"kl_cov_coef = {kl_cov_coef}: accepted values are >= 0")
        super().__init__(aggregation=aggregation, normalizer=normalizer, kl_coef=kl_coef,
                         kl_estimator=kl_estimator, entropy_coef=entropy_coef, tis_cap=tis_cap,
                         tis_level=tis_level, mask_low=mask_low, mask_high=mask_high, kl_target=kl_target,
                         kl_horizon=kl_horizon)
        self.kl_cov_ratio = kl_cov_ratio
        self.kl_cov_coef = kl_cov_coef

    def surrogate(self, rollouts: Rollouts, logprobs: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        adv = rollouts.advantages
        log_ratio = logprobs - rollouts.old_logprobs
        ratio = torch.exp(log_ratio)
        per_token = -ratio * adv
        cov = centred_covariance(adv, logprobs, mask)
        valid = mask > 0
        selected = torch.zeros_like(valid)
        n_valid = int(valid.sum().item())
        if n_valid:
            count = max(int(self.kl_cov_ratio * n_valid), 1)
            flat = cov.masked_fill(~valid, float("-inf")).flatten()
            top = torch.topk(flat, count).indices
            selected.view(-1)[top] = True
        per_token = per_token + self.kl_cov_coef * log_ratio.abs() * selected
        stats = {
            "cov_kl_frac": masked_mean(selected.float(), mask).item(),
            "cov_mean": masked_mean(cov, mask).item(),
            "ratio_mean": masked_mean(ratio.detach(), mask).item(),
        }
        return per_token, stats


@hookimpl
def rlctl_register_losses(register):
    register("clip_cov", ClipCovLoss)
    register("kl_cov", KLCovLoss)
