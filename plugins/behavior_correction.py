"""Corrections for rollouts sampled by another policy than the one scored as ``pi_old``: an inference
engine's kernels (vLLM), a stale policy (asynchronous rollouts), a shallow one (the nested sampler).

With mu the sampler's per-token probabilities (``behavior_logprobs``) and w_t = pi_old(y_t) / mu(y_t):

* truncated IS (TIS, ``tis_cap = C``): each token's surrogate weighted by min(w_t, C) (``tis_level =
  "token"``), or each sequence's by min(prod_t w_t, C) (``"sequence"``);
* masked IS / IcePop (``mask_low = a``, ``mask_high = b``): tokens with w_t outside [a, b] are dropped
  from the loss (weight 0, no gradient), the others kept with weight 1 (IcePop, "Every Step Evolves:
  Scaling Reinforcement Learning for Trillion-Scale Thinking Model", double-sided masking); with
  ``tis_level = "sequence"`` a whole sequence is dropped when its product leaves [a, b].

Both may be combined (mask first, then truncate). The weights carry no gradient. Logged:
``tis_weight_mean``, ``tis_clipped_frac`` (tokens, or sequences, whose weight hit C) and
``is_masked_frac`` (tokens dropped by the mask), over the loss's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlctl.ops import masked_mean
from rlctl.rollouts import Rollouts

LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class BehaviorCorrection:
    tis_cap: float = 0.0
    tis_level: str = "token"
    mask_low: float = 0.0
    mask_high: float = 0.0

    def __post_init__(self) -> None:
        if self.tis_cap < 0:
            raise ValueError(f"tis_cap = {self.tis_cap}: accepted values are 0 (off) or > 0")
        if self.tis_level not in LEVELS:
            raise ValueError(f"tis_level = {self.tis_level!r}: accepted values are {', '.join(LEVELS)}")
        if self.mask_low < 0 or self.mask_high < 0 or (self.mask_high and self.mask_low >= self.mask_high):
            raise ValueError(f"mask_low = {self.mask_low}, mask_high = {self.mask_high}: need 0 <= mask_low < "
                             "mask_high (0 and 0: no mask)")

    @property
    def active(self) -> bool:
        return bool(self.tis_cap or self.mask_high)

    def weights(self, rollouts: Rollouts, mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Per-token weights [N, T] (no gradient) and their statistics over ``mask``."""
        if rollouts.behavior_logprobs is None:
            raise ValueError("tis_cap / mask_high need the sampler's log-probs (rollouts.behavior_logprobs); "
                             "use a sampler that records them, or turn the correction off")
        log_w = (rollouts.old_logprobs - rollouts.behavior_logprobs).detach() * mask
        if self.tis_level == "sequence":
            log_w = log_w.sum(-1, keepdim=True).expand_as(mask)
        w = torch.exp(log_w)
        weight = torch.ones_like(w)
        stats: dict[str, float] = {}
        if self.mask_high:
            keep = (w >= self.mask_low) & (w <= self.mask_high)
            weight = weight * keep
            stats["is_masked_frac"] = masked_mean((~keep).float(), mask).item()
        if self.tis_cap:
            clipped = w > self.tis_cap
            weight = weight * w.clamp(max=self.tis_cap)
            stats["tis_clipped_frac"] = masked_mean(clipped.float(), mask).item()
        stats["tis_weight_mean"] = masked_mean(weight, mask).item()
        return weight, stats
