"""Completions from an engine (``engine.Completion`` per row) as right-padded ``Rollouts``."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlctl.generation import completion_mask
from rlctl.rollouts import Prompt, Rollouts, right_pad


def rollouts_from_completions(groups: Sequence[Sequence[tuple[list[int], list[float], str]]],
                              prompts: Sequence[Prompt], group_size: int, enc: dict[str, torch.Tensor], tok: Any,
                              eos: list[int], temperature: float, device: torch.device) -> Rollouts:
    """One group of ``group_size`` completions per prompt -> ``Rollouts``.

    Each completion's token ids and the log-prob of each sampled token become right-padded
    ``completion_ids`` and ``behavior_logprobs``; a ``"length"`` finish marks it truncated.
    """
    if len(groups) != len(prompts):
        raise RuntimeError(f"vLLM returned {len(groups)} outputs for {len(prompts)} prompts")
    rows, logps, truncated = [], [], []
    for group in groups:
        if len(group) != group_size:
            raise RuntimeError(f"vLLM returned {len(group)} completions for a group of {group_size}")
        for ids, row_logps, finish in group:
            rows.append(list(ids))
            logps.append(list(row_logps))
            truncated.append(finish == "length")
    completion_ids, generated = right_pad(rows, tok.pad_token_id)
    behavior = torch.zeros(completion_ids.shape, dtype=torch.float32)
    for i, row in enumerate(logps):
        behavior[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    mask = completion_mask(completion_ids, eos) * generated  # padding is never a completion token
    completion_ids = completion_ids.masked_fill(mask == 0, tok.pad_token_id)
    return Rollouts(
        prompt_ids=enc["input_ids"].repeat_interleave(group_size, 0).to(device),
        prompt_mask=enc["attention_mask"].repeat_interleave(group_size, 0).to(device),
        completion_ids=completion_ids.to(device),
        completion_mask=mask.to(device),
        group_ids=torch.arange(len(prompts), device=device).repeat_interleave(group_size),
        prompts=[p.text for p in prompts for _ in range(group_size)],
        completions=tok.batch_decode(completion_ids, skip_special_tokens=True),
        info=[{"answer": p.answer, **p.info, "truncated": truncated[i * group_size + j]}
              for i, p in enumerate(prompts) for j in range(group_size)],
        behavior_logprobs=(behavior * mask).to(device),
        temperature=temperature,
    )
