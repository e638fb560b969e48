"""Group-relative advantages (GRPO)."""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.ops import batch_std, broadcast_to_tokens, group_mean_std
from rlctl.rollouts import Rollouts

STD_SCOPES = ("group", "batch", "none")


class GroupRelativeAdvantage:
    """A = (r - mean_group) / (std + eps), the same value on every completion token.

    ``std_scope``: "group" (GRPO), "batch" (std over the whole batch) or "none" (no division).
    ``unbiased_std``: divide by n-1 instead of n.
    """

    requires = ("rewards",)

    def __init__(self, std_scope: str = "group", unbiased_std: bool = False, eps: float = 1e-6):
        if std_scope not in STD_SCOPES:
            raise ValueError(f"std_scope = {std_scope!r}: accepted values are {', '.join(STD_SCOPES)}")
        self.std_scope = std_scope
        self.unbiased_std = unbiased_std
        self.eps = eps

    def compute(self, rollouts: Rollouts) -> torch.Tensor:
        r = rollouts.rewards
        if r.dim() != 1:
            raise ValueError("grpo needs one reward per completion ([N]); got a process reward")
        mean, std = group_mean_std(r, rollouts.group_ids, self.unbiased_std)
        centered = r - mean
        if self.std_scope == "group":
            centered = centered / (std + self.eps)
        elif self.std_scope == "batch":
            centered = centered / (batch_std(r, self.unbiased_std) + self.eps)
        return broadcast_to_tokens(centered, rollouts.completion_mask)


@hookimpl
def rlctl_register_advantages(register):
    register("grpo", GroupRelativeAdvantage)
