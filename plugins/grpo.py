"""Group-relative advantages: GRPO and its critic-free relatives (Dr. GRPO, Lite PPO, RLOO, REINFORCE++,
NGRPO, CANON).

Each estimator turns one outcome reward per completion ([N]) into the same advantage on every completion
token. Std convention: population std (divide by n) unless ``unbiased_std = true`` (divide by n - 1);
``eps`` is added to the std in denominators.
"""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.ops import batch_std, broadcast_to_tokens, group_mean_std, masked_mean, masked_whiten
from rlctl.rollouts import Rollouts

STD_SCOPES = ("group", "batch", "none")


def outcome_rewards(rollouts: Rollouts, name: str) -> torch.Tensor:
    r = rollouts.rewards
    if r is None or r.dim() != 1:
        raise ValueError(f"{name} needs one reward per completion ([N]); got "
                         f"{'none' if r is None else 'a process reward ' + str(list(r.shape))}")
    return r.float()


class GroupRelativeAdvantage:
    """GRPO ("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models").

    A = (r - mean_group) / (std + eps), the same value on every completion token.
    ``std_scope``: "group" (GRPO), "batch" (std of all rewards in the batch) or "none" (no division).
    ``unbiased_std``: divide by n-1 instead of n.
    """

    requires = ("rewards",)
    min_group_size = 2
    name = "grpo"

    def __init__(self, std_scope: str = "group", unbiased_std: bool = False, eps: float = 1e-6):
        if std_scope not in STD_SCOPES:
            raise ValueError(f"std_scope = {std_scope!r}: accepted values are {', '.join(STD_SCOPES)}")
        if eps < 0:
            raise ValueError(f"eps = {eps}: accepted values are >= 0")
        self.std_scope = std_scope
        self.unbiased_std = unbiased_std
        self.eps = eps

    def compute(self, rollouts: Rollouts) -> torch.Tensor:
        r = outcome_rewards(rollouts, self.name)
        mean, std = group_mean_std(r, rollouts.group_ids, self.unbiased_std)
        centered = r - mean
        if self.std_scope == "group":
            centered = centered / (std + self.eps)
        elif self.std_scope == "batch":
            centered = centered / (batch_std(r, self.unbiased_std) + self.eps)
        return broadcast_to_tokens(centered, rollouts.completion_mask)


class DrGRPOAdvantage(GroupRelativeAdvantage):
    """Dr. GRPO ("Understanding R1-Zero-Like Training: A Critical Perspective"): A = r - mean_group.

    No std division (it over-weights too easy and too hard prompts); pair it with the loss aggregation
    "constant" (sum of token losses / (N * max_new_tokens)) to remove the length bias as well.
    """

    name = "dr_grpo"

    def __init__(self):
        super().__init__(std_scope="none")


class LitePPOAdvantage(GroupRelativeAdvantage):
    """Lite PPO ("Tricks or Traps? A Deep Dive into RL for LLM Reasoning", Part I).

    A = (r - mean_group) / (std_batch + eps): group-level mean, std of all rewards of the batch
    (population std unless ``unbiased_std``). Pair with token-mean aggregation.
    """

    name = "lite_ppo"

    def __init__(self, unbiased_std: bool = False, eps: float = 1e-6):
        super().__init__(std_scope="batch", unbiased_std=unbiased_std, eps=eps)


class RLOOAdvantage:
    """RLOO ("Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback
    in LLMs"): A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_group). Zero for a group of one.
    """

    requires = ("rewards",)
    min_group_size = 2

    def compute(self, rollouts: Rollouts) -> torch.Tensor:
        r = outcome_rewards(rollouts, "rloo")
        mean, _ = group_mean_std(r, rollouts.group_ids)
        _, dense, counts = torch.unique(rollouts.group_ids, return_inverse=True, return_counts=True)
        g = counts[dense].to(r.dtype)
        adv = torch.where(g > 1, (r - mean) * g / (g - 1).clamp(min=1), torch.zeros_like(r))
        return broadcast_to_tokens(adv, rollouts.completion_mask)


class ReinforcePPAdvantage:
    """REINFORCE++ with group baseline ("REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both
    Prompt and Reward Models"): A = r - mean_group on every token, then whitened over all completion
    tokens of the batch: (A - mean_tokens) / (std_tokens + eps), population std unless ``unbiased_std``.
    """

    requires = ("rewards",)
    min_group_size = 2

    def __init__(self, unbiased_std: bool = False, eps: float = 1e-6):
        if eps < 0:
            raise ValueError(f"eps = {eps}: accepted values are >= 0")
        self.unbiased_std = unbiased_std
        self.eps = eps

    def compute(self, rollouts: Rollouts) -> torch.Tensor:
        r = outcome_rewards(rollouts, "reinforce_pp")
        mean, _ = group_mean_std(r, rollouts.group_ids)
        mask = rollouts.completion_mask
        return masked_whiten(broadcast_to_tokens(r - mean, mask), mask, self.unbiased_std, self.eps)


class NGRPOAdvantage:
    """NGRPO ("NGRPO: Negative-enhanced Group Relative Policy Optimization"), advantage calibration.

    One virtual sample with reward ``max_reward`` joins every group for the mean and std only:
    A_i = (r_i - mean(r ∪ {max_reward})) / (std(r ∪ {max_reward}) + eps), population std unless
    ``unbiased_std`` (the authors' code uses n - 1). An all-wrong group [0, 0, 0] gets -0.577 each
    instead of 0. The paper's asymmetric clipping is the loss ``ngrpo_clip``.
    """

    requires = ("rewards",)
    min_group_size = 2

    def __init__(self, max_reward: float = 1.0, unbiased_std: bool = False, eps: float = 1e-6):
        if eps < 0:
            raise ValueError(f"eps = {eps}: accepted values are >= 0")
        self.max_reward = max_reward
        self.unbiased_std = unbiased_std
        self.eps = eps

    def compute(self, rollouts: Rollouts) -> torch.Tensor:
        r = outcome_rewards(rollouts, "ngrpo").double()
        _, dense, counts = torch.unique(rollouts.group_ids, return_inverse=True, return_counts=True)
        dense = dense.to(r.device)
        n = counts.to(r.device, torch.float64) + 1  # real samples + the virtual one
        total = torch.zeros_like(n).index_add_(0, dense, r) + self.max_reward
        mean = total / n
        sq = torch.zeros_like(n).index_add_(0, dense, (r - mean[dense]) ** 2) + (self.max_reward - mean) ** 2
        std = (sq / ((n - 1) if self.unbiased_std else n)).sqrt()
        adv = (r - mean[dense]) / (std[dense] + self.eps)
        return broadcast_to_tokens(adv.float(), rollouts.completion_mask)


class CANONAdvantage:
    """CANON ("Conditional Advantage Estimation for Reinforcement Learning in Large Reasoning Models").

    Each group is split by a metric into a high half (more members below it than above it) and a low
    half (the reverse); a member tied with the middle (odd groups, ties) stays in neither half. With
    mu = ``inter_weight``:

        high half: A = mu (r - mean_low)  + (1 - mu) (r - mean_high)
        low half:  A = mu (r - mean_high) + (1 - mu) (r - mean_low)
        middle:    A = r - mean_group

    The inter-half term rewards the metric direction that scores better, the intra-half term the better
    answer within a direction; no direction is presumed, so negating the metric leaves A unchanged.
    mu = 0.5 gives Dr. GRPO on evenly split groups; an empty half's mean is the group mean.
    ``metric``: "length" (completion tokens), "entropy" (mean surprisal -log pi_old of the sampled tokens,
    an unbiased estimate of the mean token entropy; needs old log-probs) or the name of a numeric
    per-sample ``info`` key.
    """

    min_group_size = 2

    def __init__(self, metric: str = "length", inter_weight: float = 1.0):
        if not metric:
            raise ValueError("metric = '': accepted values are 'length', 'entropy' or an info key")
        if not 0.0 <= inter_weight <= 1.0:
            raise ValueError(f"inter_weight = {inter_weight}: accepted values are in [0, 1]")
        self.metric = metric
        self.inter_weight = inter_weight

    @property
    def requires(self) -> tuple[str, ...]:
        return ("rewards", "old_logprobs") if self.metric == "entropy" else ("rewards",)

    def _metric(self, rollouts: Rollouts) -> torch.Tensor:
        mask = rollouts.completion_mask
        if self.metric == "length":
            return mask.sum(-1).double()
        if self.metric == "entropy":
            if rollouts.old_logprobs is None:
                raise ValueError("canon metric 'entropy' needs rollouts.old_logprobs before the advantage")
            return masked_mean(-rollouts.old_logprobs.double(), mask, dim=-1)
        try:
            values = [float(info[self.metric]) for info in rollouts.info]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"canon metric {self.metric!r}: every rollouts.info entry needs a numeric "
                             f"{self.metric!r} ({type(exc).__name__}: {exc})") from exc
        return torch.tensor(values, dtype=torch.float64, device=mask.device)

    def compute(self, rollouts: Rollouts) -> torch.Tensor:
        r = outcome_rewards(rollouts, "canon").double()
        m = self._metric(rollouts).to(r.device)
        gid = rollouts.group_ids.to(r.device)
        same = gid[:, None] == gid[None, :]
        below = (same & (m[None, :] < m[:, None])).sum(1)
        above = (same & (m[None, :] > m[:, None])).sum(1)
        side = torch.sign(below - above)  # +1 high half, -1 low half, 0 middle

        def mean_over(members: torch.Tensor) -> torch.Tensor:
            w = members.double()
            count = w.sum(1)
            group_mean = (same.double() @ r) / same.double().sum(1)
            return torch.where(count > 0, (w @ r) / count.clamp(min=1), group_mean)

        mean_group = mean_over(same)
        mean_high = mean_over(same & (side[None, :] > 0))
        mean_low = mean_over(same & (side[None, :] < 0))
        mu = self.inter_weight
        other = torch.where(side > 0, mean_low, mean_high)
        own = torch.where(side > 0, mean_high, mean_low)
        adv = torch.where(side == 0, r - mean_group, mu * (r - other) + (1 - mu) * (r - own))
        return broadcast_to_tokens(adv.float(), rollouts.completion_mask)


@hookimpl
def rlctl_register_advantages(register):
    register("grpo", GroupRelativeAdvantage)
    register("dr_grpo", DrGRPOAdvantage)
    register("lite_ppo", LitePPOAdvantage)
    register("rloo", RLOOAdvantage)
    register("reinforce_pp", ReinforcePPAdvantage)
    register("ngrpo", NGRPOAdvantage)
    register("canon", CANONAdvantage)
