"""DAPO's overlong reward shaping ("DAPO: An Open-Source LLM Reinforcement Learning System at Scale").

The other DAPO ingredients live elsewhere: clip-higher is ``ppo_clip`` with ``clip_high > clip_low``,
the token-level loss is ``aggregation = "token-mean"``, dynamic sampling is the trainer's option to drop
groups whose rewards all agree.
"""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.rollouts import Rollouts


class OverlongPenalty:
    """Soft overlong punishment on the completion token count L:

        0                                   if L <= max_len - cache_len
        (max_len - cache_len - L) / cache_len   if max_len - cache_len < L <= max_len   (0 down to -1)
        -1                                  if L > max_len

    Set ``max_len`` to the sampler's ``max_new_tokens`` (the paper: 20480 with ``cache_len`` 4096) and
    add it to a correctness reward as a second ``[[reward]]`` table. ``cache_len = 0`` is a hard -1 above
    ``max_len``.
    """

    requires: tuple[str, ...] = ()

    def __init__(self, max_len: int, cache_len: int):
        if max_len < 1:
            raise ValueError(f"max_len = {max_len}: accepted values are >= 1")
        if not 0 <= cache_len <= max_len:
            raise ValueError(f"cache_len = {cache_len}: accepted values are 0 .. max_len ({max_len})")
        self.max_len = max_len
        self.cache_len = cache_len

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        lengths = rollouts.completion_mask.sum(-1).to(torch.float32)
        if self.cache_len == 0:
            return torch.where(lengths > self.max_len, -1.0, 0.0).to(torch.float32)
        ramp = (self.max_len - self.cache_len - lengths) / self.cache_len
        return ramp.clamp(min=-1.0, max=0.0)


@hookimpl
def rlctl_register_rewards(register):
    register("overlong", OverlongPenalty)
