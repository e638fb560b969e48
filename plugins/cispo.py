"""CISPO ("MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention"): clip the
importance-sampling weight, not the update.

PPO's clip zeroes the gradient of every token whose ratio left the trust region, which drops the rare
tokens (reflective "wait", "however") that carry the largest updates. CISPO keeps every token's gradient
and only bounds its weight:

    loss_t = -sg(clip(rho_t, 1 - clip_low, 1 + clip_high)) * A_t * log pi(y_t),   rho = pi / pi_old

sg = stop-gradient, so the gradient is -clip(rho) A grad log pi (REINFORCE with a truncated IS weight).
"""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.ops import masked_mean
from rlctl.rollouts import Rollouts
from rlctl_plugins.policy_loss import ClippedPolicyLoss


class CISPOLoss(ClippedPolicyLoss):
    """CISPO ("MiniMax-M1"): -sg(clip(rho, 1 - clip_low, 1 + clip_high)) * A * log pi per token.

    Every token keeps its gradient; the clip only bounds its importance weight (no gradient through the
    weight). The paper tunes only the upper bound and leaves the lower one open: ``clip_low = 1`` (weight
    >= 0, i.e. no bound) by default; ``clip_high = 5`` as TRL recommends (after ScaleRL). Token-mean
    aggregation as in the paper. KL, entropy and behaviour-correction keys as ``ppo_clip``.
    """

    paper = "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention"

    def __init__(self, clip_low: float = 1.0, clip_high: float = 5.0, aggregation: str = "token-mean",
                 normalizer: float | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 entropy_coef: float = 0.0, tis_cap: float = 0.0, tis_level: str = "token",
                 mask_low: float = 0.0, mask_high: float = 0.0, kl_target: float = 0.0,
                 kl_horizon: float = 10000.0):
        super().__init__(clip_low, clip_high, aggregation, normalizer, kl_coef, kl_estimator, entropy_coef,
                         tis_cap=tis_cap, tis_level=tis_level, mask_low=mask_low, mask_high=mask_high,
                         kl_target=kl_target, kl_horizon=kl_horizon)

    def surrogate(self, rollouts: Rollouts, logprobs: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        ratio = torch.exp((logprobs - rollouts.old_logprobs).detach().clamp(-20.0, 20.0))
        weight = ratio.clamp(1 - self.clip_low, 1 + self.clip_high)
        per_token = -weight * rollouts.advantages * logprobs
        stats = {
            "clip_frac": masked_mean((weight != ratio).float(), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
        return per_token, stats


@hookimpl
def rlctl_register_losses(register):
    register("cispo", CISPOLoss)
