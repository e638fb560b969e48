"""ReMax ("ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large
Language Models"): REINFORCE with the reward of the greedy completion as the baseline.

    A_i = r(y_i) - r(y_greedy),   y_i sampled, y_greedy the argmax decoding of the same prompt

Two components work together, through the existing hooks only:

* the ``remax`` sampler generates ``group_size`` sampled completions per prompt (exactly as ``hf``) plus
  one greedy completion, in the same group, marked ``info["remax_greedy"] = True``. The greedy rows are
  scored by the recipe's rewards like any other row, and their ``loss_mask`` is 0, so they never enter the
  loss (token counts, KL and entropy terms included);
* the ``remax`` advantage subtracts the group's greedy reward from each sampled reward (0 on greedy rows).

Per-sequence statistics (mean reward, completion length) include the greedy rows. Sequence-averaging
aggregations count the greedy rows as sequences with zero loss; use ``token-mean`` (the default) or
``constant``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from rlctl.generation import generate
from rlctl.hookspecs import hookimpl
from rlctl.models import Policy
from rlctl.ops import broadcast_to_tokens
from rlctl.rollouts import Prompt, Rollouts
from rlctl_plugins.grpo import outcome_rewards
from rlctl_plugins.samplers import HFGenerateSampler

GREEDY_KEY = "remax_greedy"
PAPER = ("ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large "
         "Language Models")


def greedy_rows(rollouts: Rollouts) -> torch.Tensor:
    """[N] bool: the rows that hold a prompt's greedy completion."""
    flags = [bool((info or {}).get(GREEDY_KEY, False)) for info in rollouts.info] or [False] * len(rollouts)
    return torch.tensor(flags, dtype=torch.bool, device=rollouts.completion_mask.device)


class ReMaxSampler(HFGenerateSampler):
    """``group_size`` sampled completions per prompt (as ``hf``, same keys) plus one greedy completion in the
    same group, marked ``info["remax_greedy"]`` and excluded from the loss by ``loss_mask``."""

    supports_partial_rollouts = False  # the greedy pass and the sampled pass must use the same weights
    paper = PAPER

    @property
    def provides(self) -> tuple[str, ...]:
        return super().provides + ("loss_mask",)

    def sample(self, policy: Policy, prompts: Sequence[Prompt], group_size: int) -> Rollouts:
        sampled = super().sample(policy, prompts, group_size)
        greedy = generate(policy, prompts, 1, max_new_tokens=self.max_new_tokens, do_sample=False,
                          min_new_tokens=self.min_new_tokens, chat_template=self.chat_template,
                          batch_size=self.batch_size, record_logprobs=self.record_logprobs)
        for info in sampled.info:
            info[GREEDY_KEY] = False
        for info in greedy.info:
            info[GREEDY_KEY] = True
        # the sampled part first: the batch keeps its sampling temperature for scoring
        batch = Rollouts.concat([sampled, greedy], policy.tokenizer.pad_token_id)
        k, g = len(prompts), group_size
        order = [i for p in range(k) for i in [*range(p * g, (p + 1) * g), k * g + p]]  # each group together
        batch = batch.select(order)
        batch.loss_mask = batch.completion_mask * (~greedy_rows(batch)).unsqueeze(-1).to(batch.completion_mask)
        return batch


class ReMaxAdvantage:
    """ReMax: A = r - r_greedy of the same prompt on every sampled completion's tokens, 0 on the greedy row.

    Needs the ``remax`` sampler (one greedy row per group); works with ``group_size = 1`` (the paper's
    setting: one sample and one greedy completion per prompt). No std normalisation.
    """

    requires = ("rewards",)
    min_group_size = 1
    paper = PAPER

    def compute(self, rollouts: Rollouts) -> torch.Tensor:
        r = outcome_rewards(rollouts, "remax")
        greedy = greedy_rows(rollouts).to(r.device)
        groups = rollouts.group_ids.to(r.device)
        baseline = torch.zeros_like(r)
        for g in torch.unique(groups).tolist():
            members = groups == g
            rows = (members & greedy).nonzero().flatten()
            if len(rows) != 1:
                raise ValueError(f"advantage 'remax' needs exactly one greedy completion per prompt (group {g} "
                                 f"has {len(rows)}); use sampler 'remax'")
            baseline[members] = r[rows[0]]
        adv = torch.where(greedy, torch.zeros_like(r), r - baseline)
        return broadcast_to_tokens(adv, rollouts.completion_mask)


@hookimpl
def rlctl_register_samplers(register):
    register("remax", ReMaxSampler)


@hookimpl
def rlctl_register_advantages(register):
    register("remax", ReMaxAdvantage)
