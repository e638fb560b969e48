"""Samplers: Hugging Face ``generate`` with group sampling, and demonstrations for SFT."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlctl.hookspecs import hookimpl
from rlctl.models import Policy
from rlctl.rollouts import Prompt, Rollouts


def encode_prompts(tokenizer: Any, texts: Sequence[str], chat_template: bool) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids and mask (optionally through the tokenizer's chat template)."""
    if chat_template:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                          add_generation_prompt=True)
            for t in texts
        ]
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=not chat_template)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def completion_mask(ids: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it."""
    is_eos = torch.isin(ids, torch.as_tensor(list(eos_token_ids), device=ids.device))
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).long()


def trim_right(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop trailing columns that are padding in every row."""
    width = int(mask.sum(dim=1).max().item()) if mask.numel() else 0
    return ids[:, : max(width, 1)], mask[:, : max(width, 1)]


def eos_ids(policy: Policy) -> list[int]:
    eos = policy.model.generation_config.eos_token_id
    if eos is None:
        eos = policy.tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


class HFGenerateSampler:
    """Sample ``group_size`` completions per prompt with ``model.generate``."""

    def __init__(self, max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, min_new_tokens: int = 0, chat_template: bool = False,
                 batch_size: int = 0):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {max_new_tokens}: must be >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature = {temperature}: must be > 0 (sampling is required for RL)")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p = {top_p}: must be in (0, 1]")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.min_new_tokens = min_new_tokens
        self.chat_template = chat_template
        self.batch_size = batch_size  # prompts per generate call; 0 = all at once

    @torch.no_grad()
    def sample(self, policy: Policy, prompts: Sequence[Prompt], group_size: int) -> Rollouts:
        tok, model = policy.tokenizer, policy.model
        enc = encode_prompts(tok, [p.text for p in prompts], self.chat_template)
        prompt_ids = enc["input_ids"].repeat_interleave(group_size, dim=0).to(policy.device)
        prompt_mask = enc["attention_mask"].repeat_interleave(group_size, dim=0).to(policy.device)
        step = (self.batch_size or len(prompts)) * group_size
        outputs = []
        was_training = model.training
        model.eval()
        for start in range(0, prompt_ids.shape[0], step):
            out = model.generate(
                input_ids=prompt_ids[start:start + step],
                attention_mask=prompt_mask[start:start + step],
                do_sample=True,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                max_new_tokens=self.max_new_tokens,
                min_new_tokens=self.min_new_tokens,
                pad_token_id=tok.pad_token_id,
            )
            outputs.append(out[:, prompt_ids.shape[1]:])
        model.train(was_training)
        width = max(o.shape[1] for o in outputs)
        ids = torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=tok.pad_token_id)
                         for o in outputs])
        mask = completion_mask(ids, eos_ids(policy))
        if width == 0:
            mask = torch.zeros_like(ids)
        ids, mask = trim_right(ids, mask)
        ids = ids.masked_fill(mask == 0, tok.pad_token_id)
        return Rollouts(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=ids,
            completion_mask=mask,
            group_ids=torch.arange(len(prompts), device=ids.device).repeat_interleave(group_size),
            prompts=[p.text for p in prompts for _ in range(group_size)],
            completions=tok.batch_decode(ids, skip_special_tokens=True),
            info=[{"answer": p.answer, **p.info} for p in prompts for _ in range(group_size)],
            temperature=self.temperature,
        )


class DemonstrationSampler:
    """Use each prompt's demonstration (``solution``, else ``answer``) as its completion: for SFT."""

    def __init__(self, chat_template: bool = False, append_eos: bool = True):
        self.chat_template = chat_template
        self.append_eos = append_eos

    def sample(self, policy: Policy, prompts: Sequence[Prompt], group_size: int) -> Rollouts:
        tok = policy.tokenizer
        targets = []
        for p in prompts:
            text = p.solution if p.solution is not None else p.answer
            if text is None:
                raise ValueError(f"prompt {p.text[:40]!r} has no solution or answer to imitate")
            ids = tok(text, add_special_tokens=False)["input_ids"]
            targets.append(ids + ([tok.eos_token_id] if self.append_eos else []))
        width = max(len(t) for t in targets)
        ids = torch.full((len(targets), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(targets), width), dtype=torch.long)
        for i, t in enumerate(targets):
            ids[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = 1
        enc = encode_prompts(tok, [p.text for p in prompts], self.chat_template)
        return Rollouts(
            prompt_ids=enc["input_ids"].to(policy.device),
            prompt_mask=enc["attention_mask"].to(policy.device),
            completion_ids=ids.to(policy.device),
            completion_mask=mask.to(policy.device),
            group_ids=torch.arange(len(prompts), device=policy.device),
            prompts=[p.text for p in prompts],
            completions=[tok.decode(t, skip_special_tokens=True) for t in targets],
            info=[{"answer": p.answer, **p.info} for p in prompts],
        )


@hookimpl
def rlctl_register_samplers(register):
    register("hf", HFGenerateSampler)
    register("demonstrations", DemonstrationSampler)
