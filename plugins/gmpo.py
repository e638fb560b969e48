"""GMPO ("Geometric-Mean Policy Optimization"): optimise the geometric mean of the token-level rewards
rho_t A instead of their arithmetic mean, with the ratio clipped token by token in log space.

    log r_t = log pi(y_t) - log pi_old(y_t),   c_t = clip(log r_t, -clip_low, clip_high)
    A > 0: l_t = min(log r_t, c_t);   A < 0: l_t = max(log r_t, c_t)   (the PPO-style pessimistic bound)
    loss_i = -A_i * exp(mean_t l_t)

The geometric mean is far less sensitive to a single outlying token ratio than the arithmetic mean, so
the clip range can be wider (the paper: (e^-0.4, e^0.4)) while the updates stay stable.
"""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.ops import masked_mean
from rlctl.rollouts import Rollouts
from rlctl_plugins.policy_loss import ClippedPolicyLoss


class GMPOLoss(ClippedPolicyLoss):
    """GMPO ("Geometric-Mean Policy Optimization"): -A_i exp(mean_t l_t) per sequence, l_t the token log
    ratio clipped to [-clip_low, clip_high] (log space) on the side that matches the sign of A.

    One term per sequence; A_i is the mean of the sequence's token advantages (outcome advantages are the
    same on every token). ``aggregation = "seq-mean-token-mean"`` (default) averages the sequences as in
    the paper. Defaults: ``clip_low = clip_high = 0.4``, the paper's range (e^-0.4, e^0.4). KL, entropy and
    behaviour-correction keys as ``ppo_clip``.
    """

    paper = "Geometric-Mean Policy Optimization"

    def __init__(self, clip_low: float = 0.4, clip_high: float | None = 0.4,
                 aggregation: str = "seq-mean-token-mean", normalizer: float | None = None,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0,
                 tis_cap: float = 0.0, tis_level: str = "token", mask_low: float = 0.0,
                 mask_high: float = 0.0, kl_target: float = 0.0, kl_horizon: float = 10000.0):
        super().__init__(clip_low, clip_high, aggregation, normalizer, kl_coef, kl_estimator, entropy_coef,
                         tis_cap=tis_cap, tis_level=tis_level, mask_low=mask_low, mask_high=mask_high,
                         kl_target=kl_target, kl_horizon=kl_horizon)

    def surrogate(self, rollouts: Rollouts, logprobs: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        m = mask.to(logprobs.dtype)
        adv = masked_mean(rollouts.advantages.to(logprobs.dtype), m, dim=-1)  # [N]
        log_ratio = logprobs - rollouts.old_logprobs
        clipped = log_ratio.clamp(-self.clip_low, self.clip_high)
        positive = (adv >= 0).unsqueeze(-1)
        bounded = torch.where(positive, torch.minimum(log_ratio, clipped), torch.maximum(log_ratio, clipped))
        ratio = torch.exp(masked_mean(bounded, m, dim=-1))  # geometric mean of the bounded token ratios
        per_sequence = -adv * ratio
        stats = {
            "clip_frac": masked_mean((bounded != log_ratio).float(), m).item(),
            "ratio_mean": ratio.detach().mean().item() if ratio.numel() else 1.0,
        }
        # the sequence's loss on each of its tokens: seq-mean-token-mean gives the mean over sequences
        return per_sequence.unsqueeze(-1).expand_as(logprobs), stats


@hookimpl
def rlctl_register_losses(register):
    register("gmpo", GMPOLoss)
