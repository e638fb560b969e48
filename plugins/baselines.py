"""Reward baselines beyond the group mean: OPO's length-weighted optimal baseline.

"On-Policy RL with Optimal Reward Baseline" (OPO): the variance-minimising baseline for a sequence-level
policy gradient is b* = E[||grad log pi(y)||^2 r] / E[||grad log pi(y)||^2]; with the squared gradient
norm taken proportional to the response length it becomes, within each group,

    b = sum_i len_i r_i / sum_i len_i,   A_i = r_i - b

Long responses, whose gradients are larger, pull the baseline toward their rewards.
"""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.ops import broadcast_to_tokens
from rlctl.rollouts import Rollouts, group_index
from rlctl_plugins.grpo import outcome_rewards


class OPOAdvantage:
    """OPO ("On-Policy RL with Optimal Reward Baseline"): A_i = r_i - sum_j len_j r_j / sum_j len_j over the
    group, len = completion tokens; no std division.

    The paper pairs it with exactly on-policy training (``ppo_epochs = 1``, ``mini_batches = 1``), where
    the optimal-baseline derivation holds. A group of one gets A = 0 (its own reward is its baseline).
    """

    requires = ("rewards",)
    min_group_size = 2
    paper = "On-Policy RL with Optimal Reward Baseline"

    def compute(self, rollouts: Rollouts) -> torch.Tensor:
        r = outcome_rewards(rollouts, "opo").double()
        lengths = rollouts.completion_mask.sum(-1).to(r)
        dense, k = group_index(rollouts.group_ids)
        dense = dense.to(r.device)
        weighted = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, dense, lengths * r)
        total = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, dense, lengths)
        baseline = weighted / total.clamp(min=1.0)
        return broadcast_to_tokens((r - baseline[dense]).float(), rollouts.completion_mask)


@hookimpl
def rlctl_register_advantages(register):
    register("opo", OPOAdvantage)
