"""SAPO ("Soft Adaptive Policy Optimization"): a smooth, temperature-controlled gate instead of PPO's hard
clip.

    loss_t = -f_tau(rho_t) * A_t,   f_tau(rho) = (4 / tau) * sigmoid(tau * (rho - 1)),   rho = pi / pi_old

with tau = ``tau_pos`` where A > 0 and ``tau_neg`` where A <= 0. The gradient is w(rho) * rho * A * grad
log pi with w = 4 sigmoid(tau (rho - 1)) (1 - sigmoid(...)): w = 1 on policy (rho = 1, plain REINFORCE) and
decays smoothly as rho leaves 1, so an off-policy token is attenuated instead of cut. A larger tau_neg
damps negative-advantage tokens faster: their updates spread probability over the whole vocabulary and
destabilise training more.
"""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.ops import masked_mean
from rlctl.rollouts import Rollouts
from rlctl_plugins.policy_loss import ClippedPolicyLoss


class SAPOLoss(ClippedPolicyLoss):
    """SAPO ("Soft Adaptive Policy Optimization"): -(4/tau) sigmoid(tau (rho - 1)) A per token, tau =
    ``tau_pos`` for A > 0 and ``tau_neg`` otherwise (the paper's 1.0 and 1.05).

    Aggregated per sequence then over sequences (seq-mean-token-mean), the paper's objective; TRL and verl
    default to token-mean (set ``aggregation``). KL, entropy and behaviour-correction keys as ``ppo_clip``.
    """

    paper = "Soft Adaptive Policy Optimization"

    def __init__(self, tau_pos: float = 1.0, tau_neg: float = 1.05, aggregation: str = "seq-mean-token-mean",
                 normalizer: float | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 entropy_coef: float = 0.0, tis_cap: float = 0.0, tis_level: str = "token",
                 mask_low: float = 0.0, mask_high: float = 0.0, kl_target: float = 0.0,
                 kl_horizon: float = 10000.0):
        for key, value in (("tau_pos", tau_pos), ("tau_neg", tau_neg)):
            if value <= 0:
                raise ValueError(f"{key} = {value}: accepted values are > 0")
        super().__init__(aggregation=aggregation, normalizer=normalizer, kl_coef=kl_coef,
                         kl_estimator=kl_estimator, entropy_coef=entropy_coef, tis_cap=tis_cap,
                         tis_level=tis_level, mask_low=mask_low, mask_high=mask_high, kl_target=kl_target,
                         kl_horizon=kl_horizon)
        self.tau_pos = tau_pos
        self.tau_neg = tau_neg

    def surrogate(self, rollouts: Rollouts, logprobs: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        adv = rollouts.advantages
        ratio = torch.exp((logprobs - rollouts.old_logprobs).clamp(-20.0, 20.0))
        tau = torch.where(adv > 0, torch.full_like(ratio, self.tau_pos), torch.full_like(ratio, self.tau_neg))
        gate = torch.sigmoid(tau * (ratio - 1))
        per_token = -(4.0 / tau) * gate * adv
        weight = (4 * gate * (1 - gate)).detach()  # the gradient's factor relative to rho A grad log pi
        stats = {
            "soft_gate_weight": masked_mean(weight, mask).item(),
            "ratio_mean": masked_mean(ratio.detach(), mask).item(),
        }
        return per_token, stats


@hookimpl
def rlctl_register_losses(register):
    register("sapo", SAPOLoss)
