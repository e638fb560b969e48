"""Train/inference parity: how far the sampler's log-probs are from the trainer's, for the same tokens.

A sampler that records ``behavior_logprobs`` (vLLM, rlctl's own decoding with ``record_logprobs``, the
nested sampler) says what probability it gave each token it sampled. Scored by the trainer with the same
weights and temperature, an on-policy sampler should agree up to kernel noise; a weight transfer that was
skipped, a wrong dtype or a tokenizer mismatch shows up here first, long before the learning curve bends.
(For the nested sampler the gap is by design: it measures how off-policy its shallow policy is.)

Logged each step when the batch has behaviour log-probs (with several processes: the mean of their
means, and the extremes of their extremes, ``rlctl.train.engine.reduce_metrics``):

``parity_logp_mean_abs``  mean over completion tokens of ``|log p_sampler - log p_trainer|``
``parity_logp_max_abs``   the largest such difference in the batch
``parity_seq_ratio_min`` / ``parity_seq_ratio_max``
                          the extremes over sequences of ``exp(sum_t log p_trainer - log p_sampler)``, the
                          sequence-level importance ratio; 1.0 both for perfect parity
"""

from __future__ import annotations

import math

import torch


class Parity:
    """Accumulates parity over the parts (micro-batches) of one batch scored with the sampling weights."""

    def __init__(self) -> None:
        self.abs_sum, self.tokens, self.abs_max = 0.0, 0, 0.0
        self.log_ratio_min, self.log_ratio_max = math.inf, -math.inf

    def add(self, trainer: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> None:
        """``trainer``, ``sampler``: ``[N, T]`` log-probs of the same sampled tokens; ``mask`` marks them."""
        if not mask.any():
            return
        mask = mask.to(torch.float32)
        diff = (trainer.detach().float() - sampler.float()) * mask
        self.abs_sum += float(diff.abs().sum())
        self.tokens += int(mask.sum())
        self.abs_max = max(self.abs_max, float(diff.abs().max()))
        rows = mask.sum(-1) > 0
        log_ratio = diff.sum(-1)[rows]
        self.log_ratio_min = min(self.log_ratio_min, float(log_ratio.min()))
        self.log_ratio_max = max(self.log_ratio_max, float(log_ratio.max()))

    def metrics(self) -> dict[str, float]:
        if not self.tokens:
            return {}
        return {"parity_logp_mean_abs": self.abs_sum / self.tokens, "parity_logp_max_abs": self.abs_max,
                "parity_seq_ratio_min": _exp(self.log_ratio_min), "parity_seq_ratio_max": _exp(self.log_ratio_max)}


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0))  # a ratio beyond e^700 is reported as huge, not as an overflow
