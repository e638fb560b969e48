"""Prefix sampling (Prefix-RFT, "Blending Supervised and Reinforcement Fine-Tuning with Prefix Sampling").

Sampler ``prefix``: the first part of each prompt's demonstration is put after the prompt and the policy
writes the rest. The completion is the demonstration prefix followed by the policy's continuation; the
sampler records the prefix length in ``info[i]["prefix_len"]`` (tokens) and sets ``loss_mask`` to the
continuation tokens (so that a plain ``ppo_clip`` loss only reinforces what the policy wrote).

Loss ``prefix_pg``: negative log-likelihood on the prefix tokens (imitation, weight ``sft_coef``) plus the
clipped policy gradient of ``ppo_clip`` on the continuation tokens. The two masks partition the
completion mask. Rewards and advantages are computed on the whole completion, prefix included.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch

from rlctl.generation import encode_prompts, generate
from rlctl.hookspecs import hookimpl
from rlctl.models import Policy
from rlctl.ops import aggregate, masked_mean
from rlctl.rollouts import Prompt, Rollouts, right_pad
from rlctl_plugins.policy_loss import ClippedPolicyLoss
from rlctl_plugins.sft import check_nll_aggregation
from rlctl_plugins.samplers import HFGenerateSampler


def demonstration(prompt: Prompt) -> str | None:
    """The text to imitate: ``solution``, else ``answer`` (as the ``demonstrations`` sampler)."""
    text = prompt.solution if prompt.solution is not None else prompt.answer
    return text if text else None


def render_prompt(tokenizer: Any, text: str, chat_template: bool) -> str:
    """The prompt as text, rendered through the chat template like ``encode_prompts`` does, without a
    leading BOS that the tokenizer would add again when the text is tokenised with special tokens."""
    if not chat_template:
        return text
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and rendered.startswith(bos):
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        if with_special[:1] == [tokenizer.bos_token_id] and without[:1] != with_special[:1]:
            rendered = rendered[len(bos):]
    return rendered


def prefix_text(tokenizer: Any, text: str, ratio: float) -> str:
    """The first ``int(ratio * tokens)`` tokens of ``text``, as text (cut at a token boundary)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        ids, offsets = tokenizer(text, add_special_tokens=False)["input_ids"], None
    k = int(ratio * len(ids))
    if k <= 0:
        return ""
    if offsets is None:
        return tokenizer.decode(ids[:k], skip_special_tokens=True)
    return text[: offsets[k - 1][1]]


def prefix_masks(rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix mask, continuation mask) [N, T] from ``info[i]["prefix_len"]`` (0 when absent).

    Their sum is the completion mask and they never overlap. A ``loss_mask`` set on the batch further
    restricts the continuation mask.
    """
    mask = rollouts.completion_mask.bool()
    lens = torch.tensor([int((info or {}).get("prefix_len", 0)) for info in rollouts.info] or
                        [0] * mask.shape[0], device=mask.device)
    positions = torch.arange(mask.shape[1], device=mask.device)
    prefix = mask & (positions[None, :] < lens[:, None])
    continuation = mask & ~prefix
    if rollouts.loss_mask is not None:
        continuation = continuation & (rollouts.loss_mask > 0)
    return prefix.to(torch.float32), continuation.to(torch.float32)


class PrefixSampler:
    """Prefix sampling: each completion starts with a prefix of the prompt's demonstration
    (``solution``, else ``answer``) and the policy continues it.

    The prefix is the first ``int(ratio * L)`` tokens of the demonstration's L tokens, with ratio
    ``prefix_ratio``, or drawn uniformly from [``min_ratio``, ``max_ratio``] for every completion when both
    are given. ``prefixed_per_group`` completions of each group get a prefix (0: all of them); the others are
    ordinary samples, so a group mixes guided and unguided attempts. Prompts without a demonstration are
    sampled without a prefix. Generation options as the ``hf`` sampler; ``max_new_tokens`` bounds the
    continuation. The continuation is generated after the prompt text followed by the prefix text.
    """

    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ("loss_mask",)

    def __init__(self, prefix_ratio: float = 0.5, min_ratio: float | None = None,
                 max_ratio: float | None = None, prefixed_per_group: int = 0, seed: int = 0,
                 max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 min_new_tokens: int = 0, chat_template: bool = False, batch_size: int = 0):
        for name, value in (("prefix_ratio", prefix_ratio), ("min_ratio", min_ratio), ("max_ratio", max_ratio)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} = {value}: accepted values are in [0, 1]")
        if (min_ratio is None) != (max_ratio is None):
            raise ValueError("min_ratio and max_ratio: give both (a random ratio) or neither (prefix_ratio)")
        if min_ratio is not None and min_ratio > max_ratio:
            raise ValueError(f"min_ratio = {min_ratio} > max_ratio = {max_ratio}")
        if prefixed_per_group < 0:
            raise ValueError(f"prefixed_per_group = {prefixed_per_group}: must be >= 0 (0: every completion)")
        self.generator = HFGenerateSampler(max_new_tokens, temperature, top_p, top_k, min_new_tokens,
                                           chat_template, batch_size)
        self.chat_template = chat_template
        self.prefix_ratio = prefix_ratio
        self.ratio_range = None if min_ratio is None else (min_ratio, max_ratio)
        self.prefixed_per_group = prefixed_per_group
        self.rng = np.random.default_rng(seed)

    def draw_ratio(self) -> float:
        if self.ratio_range is None:
            return self.prefix_ratio
        return float(self.rng.uniform(*self.ratio_range))

    def sample(self, policy: Policy, prompts: Sequence[Prompt], group_size: int) -> Rollouts:
        tok, g = policy.tokenizer, self.generator
        prefixes: list[list[int]] = []
        ratios: list[float] = []
        guided: list[Prompt] = []
        for p in prompts:
            demo = demonstration(p)
            rendered = render_prompt(tok, p.text, self.chat_template)
            for j in range(group_size):
                text, ratio = "", 0.0
                if demo is not None and (self.prefixed_per_group == 0 or j < self.prefixed_per_group):
                    ratio = self.draw_ratio()
                    text = prefix_text(tok, demo, ratio)
                prefixes.append(tok(text, add_special_tokens=False)["input_ids"] if text else [])
                ratios.append(ratio)
                guided.append(dataclasses.replace(p, text=rendered + text))
        # one completion per guided prompt; chat rendering is already in the text
        cont = generate(policy, guided, 1, max_new_tokens=g.max_new_tokens, do_sample=True,
                        temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                        min_new_tokens=g.min_new_tokens, chat_template=False,
                        batch_size=g.batch_size * group_size)
        lengths = cont.completion_mask.sum(dim=1).tolist()
        rows = [prefix + cont.completion_ids[i, : int(lengths[i])].tolist() for i, prefix in enumerate(prefixes)]
        ids, mask = right_pad(rows, tok.pad_token_id)
        loss_mask = mask.clone()
        for i, prefix in enumerate(prefixes):
            loss_mask[i, : len(prefix)] = 0  # the policy's own continuation only
        enc = encode_prompts(tok, [p.text for p in prompts], self.chat_template)
        device = policy.device
        info = [{**cont.info[i], "prefix_len": len(prefix), "prefix_ratio": ratios[i]}
                for i, prefix in enumerate(prefixes)]
        return Rollouts(
            prompt_ids=enc["input_ids"].repeat_interleave(group_size, dim=0).to(device),
            prompt_mask=enc["attention_mask"].repeat_interleave(group_size, dim=0).to(device),
            completion_ids=ids.to(device),
            completion_mask=mask.to(device),
            loss_mask=loss_mask.to(device),
            group_ids=torch.arange(len(prompts), device=device).repeat_interleave(group_size),
            prompts=[p.text for p in prompts for _ in range(group_size)],
            completions=tok.batch_decode(ids, skip_special_tokens=True),
            info=info,
            temperature=cont.temperature,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


class PrefixPolicyLoss(ClippedPolicyLoss):
    """Prefix-RFT's objective: ``sft_coef`` times the NLL of the demonstration prefix tokens (aggregated by
    ``sft_aggregation``) plus the clipped policy gradient on the continuation tokens (``ppo_clip``, with
    all of its options, aggregated by ``aggregation``). Prefix tokens come from the sampler's
    ``info[i]["prefix_len"]``; completions without it are all continuation (plain ``ppo_clip``).
    """

    def __init__(self, sft_coef: float = 1.0, sft_aggregation: str = "token-mean", clip_low: float = 0.2,
                 clip_high: float | None = None, aggregation: str = "token-mean",
                 normalizer: float | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 entropy_coef: float = 0.0, ratio_level: str = "token", dual_clip: float = 0.0,
                 tis_cap: float = 0.0):
        super().__init__(clip_low, clip_high, aggregation, normalizer, kl_coef, kl_estimator, entropy_coef,
                         ratio_level, dual_clip, tis_cap)
        if sft_coef < 0:
            raise ValueError(f"sft_coef = {sft_coef}: must be >= 0")
        check_nll_aggregation("sft_aggregation", sft_aggregation)
        self.sft_coef = sft_coef
        self.sft_aggregation = sft_aggregation

    def totals(self, rollouts: Rollouts) -> dict[str, float]:
        """Counts of both terms: continuation tokens (the policy gradient) and prefix tokens (the NLL)."""
        prefix, continuation = prefix_masks(rollouts)
        return {"tokens": float(continuation.sum().item()), "sequences": float(len(rollouts)),
                "prefix/tokens": float(prefix.sum().item()), "prefix/sequences": float(len(rollouts))}

    def compute(self, rollouts: Rollouts, logprobs: torch.Tensor, entropy: torch.Tensor | None = None,
                **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        prefix, continuation = prefix_masks(rollouts)
        per_token, stats = self.policy_terms(rollouts, logprobs, entropy, continuation)
        pg = aggregate(per_token, continuation, self.aggregation, self.normalizer, rollouts.totals)
        if prefix.sum() > 0:
            nll = aggregate(-logprobs, prefix, self.sft_aggregation, totals=rollouts.totals, key="prefix/")
        else:
            nll = logprobs.new_zeros(())
        stats.update({
            "pg_loss": float(pg.item()),
            "prefix_nll": float(nll.item()),
            "prefix_frac": float((prefix.sum() / rollouts.completion_mask.sum().clamp(min=1)).item()),
            "continuation_adv": float(masked_mean(rollouts.advantages, continuation).item()),
        })
        return pg + self.sft_coef * nll, stats


@hookimpl
def rlctl_register_samplers(register):
    register("prefix", PrefixSampler)


@hookimpl
def rlctl_register_losses(register):
    register("prefix_pg", PrefixPolicyLoss)
