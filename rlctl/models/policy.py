"""The policy a sampler receives (model and tokenizer), its frozen reference copy, and the model cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Policy:
    """What a sampler receives: the (unwrapped) causal LM and its tokenizer.

    ``refresh`` (partial rollouts, in a rollout worker only): a sampler that decodes token by token may
    call it between steps; it loads newer published weights into ``model`` in place, if there are any,
    and returns the version now loaded. Samplers that do declare ``supports_partial_rollouts = True``.
    """

    model: Any
    tokenizer: Any
    refresh: Callable[[], int] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    return Path(os.environ.get("RLCTL_CACHE", Path.home() / ".cache" / "rlctl"))


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` in eval mode (reference policies)."""
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
