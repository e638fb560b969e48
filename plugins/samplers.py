"""Samplers: Hugging Face ``generate`` with group sampling, and demonstrations for SFT."""

from __future__ import annotations

from typing import Sequence

import torch

from rlctl.generation import encode_prompts, generate
from rlctl.hookspecs import hookimpl
from rlctl.models import Policy
from rlctl.rollouts import Prompt, Rollouts, right_pad


class HFGenerateSampler:
    """Sample ``group_size`` completions per prompt with ``model.generate``."""

    supports_partial_rollouts = True  # rlctl's own decoding loop loads newer weights between tokens

    def __init__(self, max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, min_new_tokens: int = 0, chat_template: bool = False,
                 batch_size: int = 0, record_logprobs: bool = False):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens = {max_new_tokens}: must be >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature = {temperature}: must be > 0 (sampling is required for RL)")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p = {top_p}: must be in (0, 1]")
        if top_k < 0 or min_new_tokens < 0 or batch_size < 0:
            raise ValueError("top_k, min_new_tokens and batch_size must be >= 0")
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.min_new_tokens = min_new_tokens
        self.chat_template = chat_template
        self.batch_size = batch_size  # prompts per generate call; 0 = all at once
        # behaviour log-probs from the decoding step itself (rlctl's own decoding loop; a rollout worker
        # turns this on, so that off-policy corrections need no extra forward)
        self.record_logprobs = record_logprobs

    @property
    def provides(self) -> tuple[str, ...]:
        return ("behavior_logprobs",) if self.record_logprobs else ()

    def sample(self, policy: Policy, prompts: Sequence[Prompt], group_size: int) -> Rollouts:
        return generate(policy, prompts, group_size, max_new_tokens=self.max_new_tokens, do_sample=True,
                        temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                        min_new_tokens=self.min_new_tokens, chat_template=self.chat_template,
                        batch_size=self.batch_size, record_logprobs=self.record_logprobs)


class DemonstrationSampler:
    """Use each prompt's demonstration (``solution``, else ``answer``) as its completion: for SFT."""

    deterministic = True  # completions come from the data: reference log-probs are cached

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
        ids, mask = right_pad(targets, tok.pad_token_id)
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
