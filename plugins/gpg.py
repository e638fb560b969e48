"""GPG ("GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning"): the plain policy
gradient on group-relative advantages, with no surrogate ratio, no clip, no critic and no reference.

    A_i = alpha * (r_i - mean_group) / F_norm,   loss = -sum_t A log pi / (number of tokens)

alpha = B / (B - M) corrects the gradient for the samples that carry none: B samples in the batch, M of
them in groups whose rewards all agree (A = 0). Without it the useful samples' gradient is diluted by the
batch size; with it the gradient is as if only the informative groups had been sampled.
"""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.ops import batch_std, broadcast_to_tokens, group_mean_std
from rlctl.rollouts import Rollouts
from rlctl_plugins.grpo import outcome_rewards
from rlctl_plugins.policy_loss import ClippedPolicyLoss

PAPER = "GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning"
CORRECTIONS = ("invalid_groups", "nonzero_rewards", "none")
STD_SCOPES = ("none", "group", "batch")


class GPGAdvantage:
    """GPG advantage: alpha (r - mean_group) / F_norm on every completion token.

    ``correction``: "invalid_groups" (the paper: alpha = B / (B - M), M = samples in groups whose rewards
    all agree), "nonzero_rewards" (verl's variant: alpha = B / number of non-zero rewards) or "none".
    ``std_scope``: F_norm = 1 ("none", the default, as in verl), the group std ("group") or the batch std
    ("batch"); the paper allows either 1 or the std. Population std unless ``unbiased_std``.
    """

    requires = ("rewards",)
    min_group_size = 2
    paper = PAPER

    def __init__(self, correction: str = "invalid_groups", std_scope: str = "none", unbiased_std: bool = False,
                 eps: float = 1e-6):
        if correction not in CORRECTIONS:
            raise ValueError(f"correction = {correction!r}: accepted values are {', '.join(CORRECTIONS)}")
        if std_scope not in STD_SCOPES:
            raise ValueError(f"std_scope = {std_scope!r}: accepted values are {', '.join(STD_SCOPES)}")
        if eps < 0:
            raise ValueError(f"eps = {eps}: accepted values are >= 0")
        self.correction = correction
        self.std_scope = std_scope
        self.unbiased_std = unbiased_std
        self.eps = eps

    def alpha(self, r: torch.Tensor, std: torch.Tensor) -> float:
        total = len(r)
        if self.correction == "invalid_groups":
            informative = int((std > 0).sum().item())  # a group's std is 0 exactly when its rewards agree
        elif self.correction == "nonzero_rewards":
            informative = int((r != 0).sum().item())
        else:
            return 1.0
        return total / informative if informative else 1.0

    def compute(self, rollouts: Rollouts) -> torch.Tensor:
        r = outcome_rewards(rollouts, "gpg")
        mean, std = group_mean_std(r, rollouts.group_ids, self.unbiased_std)
        adv = r - mean
        if self.std_scope == "group":
            adv = adv / (std + self.eps)
        elif self.std_scope == "batch":
            adv = adv / (batch_std(r, self.unbiased_std) + self.eps)
        alpha = self.alpha(r, std)
        self.last_stats = {"gpg_alpha": alpha}
        return broadcast_to_tokens(alpha * adv, rollouts.completion_mask)


class GPGLoss(ClippedPolicyLoss):
    """GPG loss: -A log pi per token, token-mean by default (the paper); no ratio, no clip.

    Its gradient is REINFORCE's; unlike ``ppo_clip`` it needs no old log-probs, so it is meant for one
    update per batch (``ppo_epochs = 1``, ``mini_batches = 1``). KL and entropy keys as ``ppo_clip``
    (the paper uses neither).
    """

    paper = PAPER

    def __init__(self, aggregation: str = "token-mean", normalizer: float | None = None, kl_coef: float = 0.0,
                 kl_estimator: str = "k3", entropy_coef: float = 0.0, kl_target: float = 0.0,
                 kl_horizon: float = 10000.0):
        super().__init__(aggregation=aggregation, normalizer=normalizer, kl_coef=kl_coef,
                         kl_estimator=kl_estimator, entropy_coef=entropy_coef, kl_target=kl_target,
                         kl_horizon=kl_horizon)

    @property
    def requires(self) -> tuple[str, ...]:
        return tuple(n for n in super().requires if n != "old_logprobs")

    def surrogate(self, rollouts: Rollouts, logprobs: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return -rollouts.advantages * logprobs, {}


@hookimpl
def rlctl_register_advantages(register):
    register("gpg", GPGAdvantage)


@hookimpl
def rlctl_register_losses(register):
    register("gpg", GPGLoss)
