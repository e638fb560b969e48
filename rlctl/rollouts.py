"""The one data model that flows through a training step.

A sampler creates a ``Rollouts``; the trainer and the other components fill its optional fields
(``rewards``, ``advantages``, ``ref_logprobs`` ...). Completions are right-padded to a common length T;
``completion_mask`` is 1 on real completion tokens (including a final EOS) and 0 on padding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

# Tensor fields whose first dimension is the sample dimension N (used by select/concat/to).
TENSOR_FIELDS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "group_ids",
    "behavior_logprobs",
    "old_logprobs",
    "ref_logprobs",
    "values",
    "rewards",
    "advantages",
    "returns",
    "loss_mask",
    "token_versions",
)
LIST_FIELDS = ("prompts", "completions", "info")


@dataclass
class Prompt:
    """One task instance from a data source."""

    text: str
    answer: str | None = None  # reference answer used by verifiers
    solution: str | None = None  # demonstration (chain of thought + answer) used by SFT
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollouts:
    """A batch of N completions, G per prompt (groups share ``group_ids``).

    Shapes: ``prompt_ids``/``prompt_mask`` [N, P] (left-padded), every per-token field [N, T],
    ``group_ids``/``rewards`` [N]. ``rewards`` may also be [N, T] for process rewards.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    group_ids: torch.Tensor
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    info: list[dict[str, Any]] = field(default_factory=list)
    # log-probs of the completion under the model that generated it (None when unknown)
    behavior_logprobs: torch.Tensor | None = None
    # log-probs under the policy before this batch's updates (the PPO "old" policy)
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    # optional per-token weights of the loss (e.g. prefix sampling); defaults to completion_mask
    loss_mask: torch.Tensor | None = None
    # partial rollouts: the policy version (training steps) that drew each token [N, T] (None: one
    # version drew the whole batch)
    token_versions: torch.Tensor | None = None
    # sampling temperature: the trainer scores completions at the same temperature
    temperature: float = 1.0
    # counts over the whole mini-batch of every process (set by the trainer before the loss runs on a
    # micro-batch): the denominators of ``rlctl.ops.aggregate``, so that a loss is its batch's share
    totals: dict[str, float] | None = None
    # optimizer steps the sampling policy had taken when it generated the batch (set by the trainer)
    policy_version: int | None = None

    def __len__(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum().item())

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt and completion concatenated: the sequence the trainer scores."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1).long()

    def select(self, index: torch.Tensor | Sequence[int]) -> "Rollouts":
        """The sub-batch at ``index`` (sample dimension), all fields sliced consistently."""
        idx = torch.as_tensor(index, dtype=torch.long)
        changes: dict[str, Any] = {}
        for name in TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                changes[name] = value[idx.to(value.device)]
        for name in LIST_FIELDS:
            value = getattr(self, name)
            if value:
                changes[name] = [value[i] for i in idx.tolist()]
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> "Rollouts":
        changes = {
            name: getattr(self, name).to(device) for name in TENSOR_FIELDS if getattr(self, name) is not None
        }
        return dataclasses.replace(self, **changes)

    @staticmethod
    def concat(parts: Sequence["Rollouts"], pad_token_id: int = 0) -> "Rollouts":
        """Join batches, re-padding prompts (left) and completions (right) to common lengths."""
        if len(parts) == 1:
            return parts[0]
        changes: dict[str, Any] = {}
        for name in TENSOR_FIELDS:
            values = [getattr(p, name) for p in parts]
            if all(v is None for v in values):
                continue
            if any(v is None for v in values):
                raise ValueError(f"cannot concatenate Rollouts: field {name!r} is set on some parts only")
            if values[0].dim() == 1:
                changes[name] = torch.cat(values)
            elif name.startswith("prompt"):
                width = max(v.shape[1] for v in values)
                fill = pad_token_id if name == "prompt_ids" else 0
                changes[name] = torch.cat([_pad_left(v, width, fill) for v in values])
            else:
                width = max(v.shape[1] for v in values)
                fill = pad_token_id if name == "completion_ids" else 0
                changes[name] = torch.cat([_pad_right(v, width, fill) for v in values])
        for name in LIST_FIELDS:
            changes[name] = [x for p in parts for x in getattr(p, name)]
        return dataclasses.replace(parts[0], **changes)


def _pad_left(t: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=1)


def _pad_right(t: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1]), fill, dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=1)


def right_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as a right-padded ``[N, T]`` tensor and its 0/1 mask (T >= 1)."""
    width = max([1, *(len(r) for r in rows)])
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary group ids to 0..K-1; returns (dense ids [N], K)."""
    unique, dense = torch.unique(group_ids, return_inverse=True)
    return dense, int(unique.numel())
