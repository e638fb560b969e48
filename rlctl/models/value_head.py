"""The value head of actor-critic training: a scalar value per position from the policy's hidden state."""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    """A scalar value per position from the policy's last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).squeeze(-1)
