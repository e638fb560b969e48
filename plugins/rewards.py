"""Verifiable rewards: exact final-answer match."""

from __future__ import annotations

import re

import torch

from rlctl.hookspecs import hookimpl
from rlctl.rollouts import Rollouts

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: \\boxed{...}, then text after '####', then the last number."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip() or None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize(answer: str) -> str:
    return answer.strip().replace(",", "").rstrip(".").lower()


class ExactAnswerReward:
    """1.0 when the extracted final answer equals the reference ``answer`` exactly, else 0.0.

    ``extract = false`` compares the whole stripped completion instead of an extracted answer.
    """

    def __init__(self, extract: bool = True, answer_key: str = "answer"):
        self.extract = extract
        self.answer_key = answer_key

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        scores = []
        for text, info in zip(rollouts.completions, rollouts.info):
            gold = info.get(self.answer_key)
            got = extract_answer(text) if self.extract else text
            scores.append(float(gold is not None and got is not None and normalize(got) == normalize(str(gold))))
        return torch.tensor(scores, dtype=torch.float32)


@hookimpl
def rlctl_register_rewards(register):
    register("exact", ExactAnswerReward)
