"""Supervised fine-tuning: token negative log-likelihood of the completion (demonstration)."""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.ops import AGGREGATIONS, aggregate
from rlctl.rollouts import Rollouts


NLL_AGGREGATIONS = tuple(a for a in AGGREGATIONS if a != "constant")


def check_nll_aggregation(key: str, value: str) -> None:
    """Aggregations that make sense for a likelihood term (no constant normaliser)."""
    if value not in NLL_AGGREGATIONS:
        raise ValueError(f"{key} = {value!r}: accepted values are {', '.join(NLL_AGGREGATIONS)}")


class SFTLoss:
    """Mean negative log-likelihood of completion tokens (``aggregation`` as in ``rlctl.ops``)."""

    requires: tuple[str, ...] = ()

    def __init__(self, aggregation: str = "token-mean"):
        check_nll_aggregation("aggregation", aggregation)
        self.aggregation = aggregation

    def compute(self, rollouts: Rollouts, logprobs: torch.Tensor,
                **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        mask = rollouts.loss_mask if rollouts.loss_mask is not None else rollouts.completion_mask
        nll = aggregate(-logprobs, mask, self.aggregation, totals=rollouts.totals)
        return nll, {"nll": nll.item()}


@hookimpl
def rlctl_register_losses(register):
    register("sft", SFTLoss)
