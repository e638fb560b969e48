"""Offline preference optimisation: a sampler of (chosen, rejected) pairs and pairwise losses.

The ``pairs`` sampler lays a batch out as consecutive pairs: the chosen completion of prompt k at
row 2k and its rejected completion at row 2k + 1, both with group id k and marked by
``info["pair_role"]``. The losses match rows by group id and role (or, for unmarked rows, by that
layout), so shuffled rows pair correctly; a split that separates a pair is an error. A sequence's
log-probability is the sum of its token log-probs over ``completion_mask``.

With h = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l)) the policy's log-ratio
margin over the reference, the losses are (averaged over pairs):

=============  ==============================================================================
dpo            -log σ(β h)
ipo            (h - 1/(2β))²   (``length_normalize``: h from per-token mean log-probs, as TRL)
rdpo           [(1-ε)(-log σ(β h)) - ε(-log σ(-β h))] / (1 - 2ε)
margin_dpo     -log σ(β h - m), m = margin_scale · info[margin_key]
simpo          -log σ(β (log π(y_w)/|y_w| - log π(y_l)/|y_l|) - γ)   (no reference model)
=============  ==============================================================================

``wpo = true`` (dpo, ipo and the losses of ``preference_variants.py``) weights each pair's loss by WPO's
w = exp(mean_t log π(y_w,t) + mean_t log π(y_l,t)), without gradient ("WPO: Enhancing RLHF with Weighted
Preference Optimization"): pairs the current policy is more likely to produce count more, simulating
on-policy data. The paper also describes a variant whose per-token terms are normalised by
sum_v π(v)^2 over the vocabulary; a loss only receives the sampled tokens' log-probs, not the full
next-token distribution, so that variant is not offered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from rlctl.generation import encode_prompts
from rlctl.hookspecs import hookimpl
from rlctl.models import Policy
from rlctl.ops import batch_mean
from rlctl.rollouts import Prompt, Rollouts, right_pad

ROLE_KEY = "pair_role"  # info key the pairs sampler sets on every row
CHOSEN, REJECTED = "chosen", "rejected"


# ---------------------------------------------------------------------------------------- sampler
class PairSampler:
    """One (chosen, rejected) pair per prompt, from ``prompt.info[chosen_key]`` and ``[rejected_key]``.

    Row 2k holds the chosen completion of prompt k, row 2k + 1 its rejected completion; both share
    group id k and are marked ``info["pair_role"] = "chosen"`` / ``"rejected"`` so the losses still
    pair them after the trainer shuffles rows. ``group_size`` from the recipe is ignored: a pair is
    always two completions. Completions are tokenized without special tokens, optionally end with
    EOS, and are cut to ``max_completion_tokens`` (0 = no limit). Nothing is generated, so no
    log-probs are recorded.
    """

    deterministic = True  # completions come from the data: reference log-probs are cached

    def __init__(self, chosen_key: str = "chosen", rejected_key: str = "rejected",
                 chat_template: bool = False, append_eos: bool = True, max_completion_tokens: int = 0):
        if max_completion_tokens < 0:
            raise ValueError(f"max_completion_tokens = {max_completion_tokens}: accepted values are >= 0 "
                             "(0 = no limit)")
        if chosen_key == rejected_key:
            raise ValueError(f"rejected_key = {rejected_key!r}: accepted values differ from chosen_key")
        self.chosen_key = chosen_key
        self.rejected_key = rejected_key
        self.chat_template = chat_template
        self.append_eos = append_eos
        self.max_completion_tokens = max_completion_tokens

    def texts(self, prompt: Prompt) -> tuple[str, str]:
        pair = []
        for key in (self.chosen_key, self.rejected_key):
            value = prompt.info.get(key)
            if not isinstance(value, str):
                raise ValueError(f"prompt {prompt.text[:40]!r}: info[{key!r}] must be the completion text "
                                 f"(got {type(value).__name__}); the data source must provide "
                                 f"{self.chosen_key!r} and {self.rejected_key!r} strings")
            pair.append(value)
        return pair[0], pair[1]

    def encode(self, tokenizer: Any, text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.append_eos:
            ids = ids + [tokenizer.eos_token_id]
        if self.max_completion_tokens:
            ids = ids[: self.max_completion_tokens]
        return ids

    def sample(self, policy: Policy, prompts: Sequence[Prompt], group_size: int = 2) -> Rollouts:
        tok = policy.tokenizer
        completions = [text for p in prompts for text in self.texts(p)]
        targets = [self.encode(tok, text) for text in completions]
        ids, mask = right_pad(targets, tok.pad_token_id)
        enc = encode_prompts(tok, [p.text for p in prompts], self.chat_template)
        device = policy.device
        return Rollouts(
            prompt_ids=enc["input_ids"].repeat_interleave(2, dim=0).to(device),
            prompt_mask=enc["attention_mask"].repeat_interleave(2, dim=0).to(device),
            completion_ids=ids.to(device),
            completion_mask=mask.to(device),
            group_ids=torch.arange(len(prompts), device=device).repeat_interleave(2),
            prompts=[p.text for p in prompts for _ in range(2)],
            completions=[tok.decode(t, skip_special_tokens=True) for t in targets],
            info=[{"answer": p.answer, **p.info, ROLE_KEY: role}
                  for p in prompts for role in (CHOSEN, REJECTED)],
        )


# ---------------------------------------------------------------------------------------- helpers
@dataclass
class PairLogps:
    """Summed log-probs [pairs] of chosen (w) and rejected (l) completions, and their token counts."""

    policy_w: torch.Tensor
    policy_l: torch.Tensor
    len_w: torch.Tensor
    len_l: torch.Tensor
    chosen_rows: torch.Tensor
    ref_w: torch.Tensor | None = None
    ref_l: torch.Tensor | None = None

    @property
    def log_ratio_margin(self) -> torch.Tensor:
        """h = (log π_w - log ref_w) - (log π_l - log ref_l)."""
        return (self.policy_w - self.ref_w) - (self.policy_l - self.ref_l)

    @property
    def chosen_log_ratio(self) -> torch.Tensor:
        """log π_w - log ref_w (β times it is the chosen implicit reward)."""
        return self.policy_w - self.ref_w

    @property
    def rejected_log_ratio(self) -> torch.Tensor:
        """log π_l - log ref_l."""
        return self.policy_l - self.ref_l

    @property
    def mean_log_ratio_margin(self) -> torch.Tensor:
        """h with every sequence log-prob divided by its length (TRL's length-normalised IPO)."""
        return (self.policy_w - self.ref_w) / self.len_w - (self.policy_l - self.ref_l) / self.len_l

    def wpo_weights(self) -> torch.Tensor:
        """WPO's pair weight exp(mean_t log π(y_w) + mean_t log π(y_l)) in (0, 1], no gradient."""
        return torch.exp(self.policy_w / self.len_w + self.policy_l / self.len_l).detach().clamp(max=1.0)

    def reference_stats(self, beta: float) -> dict[str, float]:
        """``pair_stats`` of the implicit rewards β (log π - log π_ref)."""
        return pair_stats(beta * (self.policy_w - self.ref_w), beta * (self.policy_l - self.ref_l))


def pair_index(rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (chosen, rejected) of every pair, ordered by group id.

    Rows marked by ``info["pair_role"]`` (as the ``pairs`` sampler does) are matched by group id, so
    a batch whose rows were shuffled still pairs correctly; unmarked rows must follow the layout
    chosen at 2k, rejected at 2k + 1, with equal group ids.
    """
    n = len(rollouts)
    groups = rollouts.group_ids.tolist()
    roles = [info.get(ROLE_KEY) for info in rollouts.info] if len(rollouts.info) == n else []
    if n and roles and all(r in (CHOSEN, REJECTED) for r in roles):
        rows: dict[str, dict[int, int]] = {CHOSEN: {}, REJECTED: {}}
        for i, (g, role) in enumerate(zip(groups, roles)):
            if g in rows[role]:
                raise ValueError(f"preference losses need one chosen and one rejected row per group; "
                                 f"group {g} has two {role} rows")
            rows[role][g] = i
        if rows[CHOSEN].keys() != rows[REJECTED].keys():
            unpaired = sorted(rows[CHOSEN].keys() ^ rows[REJECTED].keys())
            raise ValueError(f"preference losses need whole pairs in every (micro-)batch; groups {unpaired} "
                             "have only one row (keep pairs together when splitting batches)")
        order = sorted(rows[CHOSEN])
        return (torch.tensor([rows[CHOSEN][g] for g in order], dtype=torch.long),
                torch.tensor([rows[REJECTED][g] for g in order], dtype=torch.long))
    if n == 0 or n % 2 or groups[0::2] != groups[1::2]:
        raise ValueError(f"preference losses need (chosen, rejected) pairs: rows marked by "
                         f"info[{ROLE_KEY!r}], or chosen at row 2k and rejected at 2k+1 with equal group "
                         f"ids; got {n} rows with group ids {groups[:8]} (use sampler 'pairs')")
    return torch.arange(0, n, 2), torch.arange(1, n, 2)


def pair_logps(rollouts: Rollouts, logprobs: torch.Tensor, with_ref: bool) -> PairLogps:
    """Chosen/rejected sequence log-probs of a pairs batch (sums over ``completion_mask``)."""
    w, r = (i.to(logprobs.device) for i in pair_index(rollouts))
    mask = rollouts.completion_mask.to(logprobs.dtype)
    seq = (logprobs * mask).sum(-1)
    lengths = mask.sum(-1).clamp(min=1.0)
    out = PairLogps(policy_w=seq[w], policy_l=seq[r], len_w=lengths[w], len_l=lengths[r], chosen_rows=w)
    if with_ref:
        if rollouts.ref_logprobs is None:
            raise ValueError("this preference loss needs rollouts.ref_logprobs (a reference model)")
        ref = (rollouts.ref_logprobs.to(logprobs.dtype) * mask).sum(-1).detach()
        out.ref_w, out.ref_l = ref[w], ref[r]
    return out


def pair_stats(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor) -> dict[str, float]:
    """Implicit-reward statistics: accuracy (chosen reward > rejected reward) and mean margin."""
    margin = (chosen_reward - rejected_reward).detach()
    return {
        "reward_accuracy": (margin > 0).float().mean().item(),
        "margin": margin.mean().item(),
        "chosen_reward": chosen_reward.detach().mean().item(),
        "rejected_reward": rejected_reward.detach().mean().item(),
    }


def _check_beta(beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta = {beta}: accepted values are > 0")


# ----------------------------------------------------------------------------------------- losses
class PairLoss:
    """Preference losses average over pairs: ``totals`` counts them, so that the loss of a micro-batch is
    its share of the mean over every pair of the mini-batch (``rlctl.ops.batch_mean``)."""

    wpo = False  # losses that offer WPO weighting set it from their ``wpo`` key

    def totals(self, rollouts: Rollouts) -> dict[str, float]:
        return {"pairs": float(len(pair_index(rollouts)[0])) if len(rollouts) else 0.0}

    def reduce(self, losses: torch.Tensor, lp: PairLogps, rollouts: Rollouts,
               stats: dict[str, float]) -> torch.Tensor:
        """The micro-batch's share of the mean over pairs, WPO-weighted when ``wpo`` is set."""
        if self.wpo:
            weights = lp.wpo_weights()
            losses = losses * weights
            stats["wpo_weight"] = weights.mean().item()
        return batch_mean(losses, rollouts.totals, "pairs")


class DPOLoss(PairLoss):
    """Direct Preference Optimization ("Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model"): -log σ(β h), h the chosen-minus-rejected log-ratio to the reference.

    At π = π_ref the loss is log 2. Implicit rewards are β (log π - log π_ref). ``wpo``: WPO pair weights.
    """

    requires: tuple[str, ...] = ("ref_logprobs",)
    paper = "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"

    def __init__(self, beta: float = 0.1, wpo: bool = False):
        _check_beta(beta)
        self.beta = beta
        self.wpo = wpo

    def compute(self, rollouts: Rollouts, logprobs: torch.Tensor,
                **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        lp = pair_logps(rollouts, logprobs, with_ref=True)
        stats = lp.reference_stats(self.beta)
        loss = self.reduce(-F.logsigmoid(self.beta * lp.log_ratio_margin), lp, rollouts, stats)
        return loss, stats


class IPOLoss(PairLoss):
    """Identity Preference Optimisation ("A General Theoretical Paradigm to Understand Learning from
    Human Preferences"): (h - 1/(2β))², regressing the log-ratio margin to a finite target.

    At π = π_ref the loss is (1/(2β))². The paper's h uses summed sequence log-probs (the default);
    ``length_normalize = true`` divides each by its length first, as TRL's ``ipo`` does. ``wpo``: WPO
    pair weights.
    """

    requires: tuple[str, ...] = ("ref_logprobs",)
    paper = "A General Theoretical Paradigm to Understand Learning from Human Preferences"

    def __init__(self, beta: float = 0.1, length_normalize: bool = False, wpo: bool = False):
        _check_beta(beta)
        self.beta = beta
        self.length_normalize = length_normalize
        self.wpo = wpo

    def compute(self, rollouts: Rollouts, logprobs: torch.Tensor,
                **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        lp = pair_logps(rollouts, logprobs, with_ref=True)
        h = lp.mean_log_ratio_margin if self.length_normalize else lp.log_ratio_margin
        stats = lp.reference_stats(self.beta)
        loss = self.reduce((h - 1.0 / (2.0 * self.beta)) ** 2, lp, rollouts, stats)
        return loss, stats


class SimPOLoss(PairLoss):
    """SimPO ("SimPO: Simple Preference Optimization with a Reference-Free Reward"):
    -log σ(β (log π(y_w)/|y_w| - log π(y_l)/|y_l|) - γ), length-normalised and reference-free.

    Implicit rewards are β · average token log-prob; ``gamma`` is the target reward margin.
    """

    requires: tuple[str, ...] = ()
    paper = "SimPO: Simple Preference Optimization with a Reference-Free Reward"

    def __init__(self, beta: float = 2.0, gamma: float = 0.5):
        _check_beta(beta)
        self.beta = beta
        self.gamma = gamma

    def compute(self, rollouts: Rollouts, logprobs: torch.Tensor,
                **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        lp = pair_logps(rollouts, logprobs, with_ref=False)
        reward_w = self.beta * lp.policy_w / lp.len_w
        reward_l = self.beta * lp.policy_l / lp.len_l
        loss = batch_mean(-F.logsigmoid(reward_w - reward_l - self.gamma), rollouts.totals, "pairs")
        return loss, pair_stats(reward_w, reward_l)


class RobustDPOLoss(PairLoss):
    """Robust DPO ("Provably Robust DPO: Aligning Language Models with Noisy Feedback"), for labels
    flipped with probability ``eps``: [(1-ε) ℓ(w,l) - ε ℓ(l,w)] / (1 - 2ε) with ℓ(w,l) = -log σ(β h)
    and ℓ(l,w) = -log σ(-β h), an unbiased estimate of the clean-label DPO loss. ε = 0 is DPO.
    """

    requires: tuple[str, ...] = ("ref_logprobs",)
    paper = "Provably Robust DPO: Aligning Language Models with Noisy Feedback"

    def __init__(self, beta: float = 0.1, eps: float = 0.1):
        _check_beta(beta)
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"eps = {eps}: accepted values are in [0, 0.5)")
        self.beta = beta
        self.eps = eps

    def compute(self, rollouts: Rollouts, logprobs: torch.Tensor,
                **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        lp = pair_logps(rollouts, logprobs, with_ref=True)
        logits = self.beta * lp.log_ratio_margin
        forward, flipped = -F.logsigmoid(logits), -F.logsigmoid(-logits)
        loss = batch_mean((((1 - self.eps) * forward - self.eps * flipped) / (1 - 2 * self.eps)), rollouts.totals, "pairs")
        return loss, lp.reference_stats(self.beta)


class MarginDPOLoss(PairLoss):
    """DPO with a per-pair offset (as in "Direct Preference Optimization with an Offset"):
    -log σ(β h - m), with m = ``margin_scale`` · ``info[margin_key]`` of the pair's chosen row, so
    pairs with a larger preference gap must be separated by a larger implicit-reward margin.
    A pair without the key is an error.
    """

    requires: tuple[str, ...] = ("ref_logprobs",)
    paper = "Direct Preference Optimization with an Offset"

    def __init__(self, beta: float = 0.1, margin_key: str = "margin", margin_scale: float = 1.0):
        _check_beta(beta)
        self.beta = beta
        self.margin_key = margin_key
        self.margin_scale = margin_scale

    def margins(self, rollouts: Rollouts, chosen_rows: torch.Tensor, device: torch.device,
                dtype: torch.dtype) -> torch.Tensor:
        values = []
        for row in chosen_rows.tolist():
            info = rollouts.info[row]
            if info.get(self.margin_key) is None:
                raise ValueError(f"loss 'margin_dpo' needs info[{self.margin_key!r}] on every pair "
                                 "(the data source must provide it)")
            values.append(float(info[self.margin_key]))
        return self.margin_scale * torch.tensor(values, device=device, dtype=dtype)

    def compute(self, rollouts: Rollouts, logprobs: torch.Tensor,
                **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        lp = pair_logps(rollouts, logprobs, with_ref=True)
        margin = self.margins(rollouts, lp.chosen_rows, logprobs.device, logprobs.dtype)
        loss = batch_mean(-F.logsigmoid(self.beta * lp.log_ratio_margin - margin), rollouts.totals, "pairs")
        stats = lp.reference_stats(self.beta)
        stats["target_margin"] = margin.mean().item()
        return loss, stats


@hookimpl
def rlctl_register_samplers(register):
    register("pairs", PairSampler)


@hookimpl
def rlctl_register_losses(register):
    register("dpo", DPOLoss)
    register("ipo", IPOLoss)
    register("simpo", SimPOLoss)
    register("rdpo", RobustDPOLoss)
    register("margin_dpo", MarginDPOLoss)
