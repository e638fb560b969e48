"""ReFT's reward ("ReFT: Reasoning with Reinforced Fine-Tuning").

ReFT is a recipe: an SFT warm-up on (question, chain of thought) demonstrations (loss ``sft``), then PPO
with a value head (advantage ``gae`` with ``kl_coef`` > 0 for the per-token KL to the warm-up policy,
loss ``ppo``) on this reward.
"""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.rollouts import Rollouts
from rlctl_plugins.rewards import extract_answer, normalize


def same_answer(got: str, gold: str) -> bool:
    """Equal after normalisation, or equal as numbers ("7.0" and "7")."""
    a, b = normalize(got), normalize(gold)
    if a == b:
        return True
    try:
        return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))
    except ValueError:
        return False


class ReftReward:
    """1.0 when the extracted final answer matches the reference, ``partial`` (0.1) when an answer can be
    extracted but is wrong, 0.0 when none can be extracted (or the prompt has no reference answer).
    The partial reward eases the sparse signal of a 0/1 reward for answers that are well formed.
    """

    requires: tuple[str, ...] = ()

    def __init__(self, partial: float = 0.1, answer_key: str = "answer"):
        if not 0.0 <= partial <= 1.0:
            raise ValueError(f"partial = {partial}: accepted values are in [0, 1]")
        self.partial = partial
        self.answer_key = answer_key

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        scores = []
        for text, info in zip(rollouts.completions, rollouts.info):
            gold, got = info.get(self.answer_key), extract_answer(text)
            if gold is None or got is None:
                scores.append(0.0)
            else:
                scores.append(1.0 if same_answer(got, str(gold)) else self.partial)
        return torch.tensor(scores, dtype=torch.float32)


@hookimpl
def rlctl_register_rewards(register):
    register("reft", ReftReward)
