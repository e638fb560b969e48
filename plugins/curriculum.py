"""SFT/RL mixing by step: a scheduler that moves a mixing weight w over a stage, a sampler that returns
demonstrations next to sampled completions, and a loss that imitates the first and reinforces the second.

- scheduler ``sft_rl_mix``: w goes linearly from ``start`` to ``end`` between two steps of the stage
  (equal steps: a phase switch) and is set, before every update, as ``mix_weight`` on the stage's loss
  and sampler when they have one. It also sets the learning rate (constant, linear or cosine).
- sampler ``mixed``: a share of the step's prompts (``demo_fraction``, or w) gets its demonstration as the
  only completion (``info[i]["demonstration"] = True``, a group of its own); the others get
  ``group_size`` sampled completions.
- loss ``mixed``: w * NLL(demonstration rows) + (1 - w) * clipped policy gradient (sampled rows). Each
  term is a mean over its own rows, so w sets the share of the gradient and the sampler's fraction only
  the share of the batch (compute).

Staged data needs no component: a ``[[stage]]`` may bring its own ``data`` table (docs/selection.md).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from rlctl.hookspecs import hookimpl
from rlctl.models import Policy
from rlctl.ops import aggregate
from rlctl.rollouts import Prompt, Rollouts
from rlctl_plugins.policy_loss import ClippedPolicyLoss
from rlctl_plugins.sft import check_nll_aggregation
from rlctl_plugins.prefix import demonstration
from rlctl_plugins.samplers import DemonstrationSampler, HFGenerateSampler


def _check_weight(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} = {value}: accepted values are in [0, 1]")


class SFTRLMixSchedule:
    """Mixing weight w (the SFT share) by step within the stage, plus the learning rate.

    w = ``start`` up to step ``ramp_start``, ``end`` from step ``ramp_end`` on (-1: the stage's last
    step), linear in between; ``ramp_start == ramp_end`` switches phase at that step. The weight is set as
    ``mix_weight`` on the stage's loss and sampler (e.g. loss ``mixed``, sampler ``mixed``); at least one
    of them must have it. It is the stage's scheduler, so it also sets the learning rate: with
    ``lr_schedule`` (a registered scheduler: ``constant``, ``linear``, ``cosine`` ...) built with
    ``warmup_steps`` and ``min_lr_ratio``.
    """

    def __init__(self, start: float = 1.0, end: float = 0.0, ramp_start: int = 0, ramp_end: int = -1,
                 lr_schedule: str = "constant", warmup_steps: int = 0, min_lr_ratio: float = 0.0):
        _check_weight("start", start)
        _check_weight("end", end)
        if ramp_start < 0:
            raise ValueError(f"ramp_start = {ramp_start}: must be >= 0")
        if ramp_end != -1 and ramp_end < ramp_start:
            raise ValueError(f"ramp_end = {ramp_end}: must be >= ramp_start ({ramp_start}) or -1 (last step)")
        if lr_schedule == "sft_rl_mix":
            raise ValueError("lr_schedule = 'sft_rl_mix': name a learning-rate schedule, e.g. 'constant'")
        self.start, self.end = start, end
        self.ramp_start, self.ramp_end = ramp_start, ramp_end
        from rlctl import plugins

        options = {k: v for k, v in (("warmup_steps", warmup_steps), ("min_lr_ratio", min_lr_ratio)) if v}
        self.lr = plugins.get("scheduler", lr_schedule)(**options)
        self.weight_now: float | None = None

    def weight(self, stage_step: int, stage_steps: int) -> float:
        last = max(0, stage_steps - 1)
        begin = min(self.ramp_start, last)
        end = last if self.ramp_end == -1 else self.ramp_end
        if end <= begin:
            progress = 1.0 if stage_step >= end else 0.0
        else:
            progress = min(1.0, max(0.0, (stage_step - begin) / (end - begin)))
        return self.start + (self.end - self.start) * progress

    def step(self, state: Any) -> None:
        self.lr.step(state)
        w = self.weight(state.stage_step, state.stage_steps)
        targets = [state.components.get(kind) for kind in ("loss", "sampler")]
        targets = [c for c in targets if c is not None and hasattr(c, "mix_weight")]
        if not targets:
            raise ValueError("scheduler 'sft_rl_mix' sets a mixing weight, but neither the stage's loss nor "
                             "its sampler has one (use loss 'mixed' and/or sampler 'mixed')")
        for component in targets:
            component.mix_weight = w
        self.weight_now = w


class MixedSampler:
    """Demonstrations and sampled completions in one batch.

    ``demo_fraction`` of the prompts (rounded; default: the mixing weight w, ``weight`` until a
    ``sft_rl_mix`` scheduler sets it) get their demonstration (``solution``, else ``answer``) as the only
    completion, in a group of their own, marked ``info[i]["demonstration"] = True``; the other prompts get
    ``group_size`` completions from the policy (options as the ``hf`` sampler), marked False. Which
    prompts are demonstrations is drawn with a seeded RNG; prompts without a demonstration are always
    sampled. With w = 1 nothing is generated, with w = 0 nothing is imitated.
    """

    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def __init__(self, demo_fraction: float | None = None, weight: float = 0.5, append_eos: bool = True,
                 seed: int = 0, max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, min_new_tokens: int = 0, chat_template: bool = False, batch_size: int = 0):
        if demo_fraction is not None:
            _check_weight("demo_fraction", demo_fraction)
        _check_weight("weight", weight)
        self.generator = HFGenerateSampler(max_new_tokens, temperature, top_p, top_k, min_new_tokens,
                                           chat_template, batch_size)
        self.demonstrations = DemonstrationSampler(chat_template=chat_template, append_eos=append_eos)
        self.chat_template = chat_template
        self.demo_fraction = demo_fraction
        self.mix_weight = weight
        self.rng = np.random.default_rng(seed)

    def split(self, prompts: Sequence[Prompt]) -> list[bool]:
        """Which prompts are demonstrations this step."""
        fraction = self.mix_weight if self.demo_fraction is None else self.demo_fraction
        eligible = [i for i, p in enumerate(prompts) if demonstration(p) is not None]
        count = min(len(eligible), int(round(fraction * len(prompts))))
        chosen = set(self.rng.permutation(eligible)[:count].tolist()) if count else set()
        return [i in chosen for i in range(len(prompts))]

    def sample(self, policy: Policy, prompts: Sequence[Prompt], group_size: int) -> Rollouts:
        is_demo = self.split(prompts)
        sampled = [p for p, d in zip(prompts, is_demo) if not d]
        demos = [p for p, d in zip(prompts, is_demo) if d]
        parts = []
        if sampled:  # first: the joined batch keeps the first part's sampling temperature
            batch = self.generator.sample(policy, sampled, group_size)
            for info in batch.info:
                info["demonstration"] = False
            parts.append(batch)
        if demos:
            batch = self.demonstrations.sample(policy, demos, 1)
            batch.group_ids = batch.group_ids + len(sampled)
            for info in batch.info:
                info["demonstration"] = True
                info["truncated"] = False
            parts.append(batch)
        return Rollouts.concat(parts, pad_token_id=policy.tokenizer.pad_token_id)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]


def demonstration_rows(rollouts: Rollouts) -> torch.Tensor:
    """Boolean [N]: the rows marked ``info[i]["demonstration"]``."""
    flags = [bool((info or {}).get("demonstration", False)) for info in rollouts.info]
    return torch.tensor(flags or [False] * len(rollouts), dtype=torch.bool, device=rollouts.completion_mask.device)


class MixedLoss(ClippedPolicyLoss):
    """w * NLL on demonstration rows + (1 - w) * clipped policy gradient on sampled rows.

    w is ``mix_weight``: the option ``weight`` until a ``sft_rl_mix`` scheduler sets it. The NLL is
    aggregated over the demonstration rows by ``sft_aggregation``, the policy gradient over the sampled
    rows by ``aggregation`` with every option of ``ppo_clip``. A micro-batch without rows of one kind
    contributes 0 for that term. Rows are told apart by ``info[i]["demonstration"]`` (sampler ``mixed``).
    """

    def __init__(self, weight: float = 0.5, sft_aggregation: str = "token-mean", clip_low: float = 0.2,
                 clip_high: float | None = None, aggregation: str = "token-mean",
                 normalizer: float | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 entropy_coef: float = 0.0, ratio_level: str = "token", dual_clip: float = 0.0,
                 tis_cap: float = 0.0):
        super().__init__(clip_low, clip_high, aggregation, normalizer, kl_coef, kl_estimator, entropy_coef,
                         ratio_level, dual_clip, tis_cap)
        _check_weight("weight", weight)
        check_nll_aggregation("sft_aggregation", sft_aggregation)
        self.mix_weight = weight
        self.sft_aggregation = sft_aggregation

    def totals(self, rollouts: Rollouts) -> dict[str, float]:
        """Counts of both terms: sampled rows (the policy gradient) and demonstration rows (the NLL)."""
        mask = (rollouts.loss_mask if rollouts.loss_mask is not None else rollouts.completion_mask).float()
        demo = demonstration_rows(rollouts).cpu()
        mask = mask.cpu()
        return {"tokens": float(mask[~demo].sum().item()), "sequences": float((~demo).sum().item()),
                "demo/tokens": float(mask[demo].sum().item()), "demo/sequences": float(demo.sum().item())}

    def compute(self, rollouts: Rollouts, logprobs: torch.Tensor, entropy: torch.Tensor | None = None,
                **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        w = float(self.mix_weight)
        mask = rollouts.loss_mask if rollouts.loss_mask is not None else rollouts.completion_mask
        demo = demonstration_rows(rollouts)
        zero = logprobs.new_zeros(())
        nll, pg, stats = zero, zero, {}
        if demo.any():
            nll = aggregate(-logprobs[demo], mask[demo], self.sft_aggregation, totals=rollouts.totals, key="demo/")
        if (~demo).any():
            idx = (~demo).nonzero().flatten()
            sub = rollouts.select(idx.cpu())
            sub_entropy = entropy[idx] if entropy is not None else None
            per_token, stats = self.policy_terms(sub, logprobs[idx], sub_entropy, mask[idx])
            pg = aggregate(per_token, mask[idx], self.aggregation, self.normalizer, rollouts.totals)
        stats.update({"mix_weight": w, "sft_nll": float(nll.item()), "pg_loss": float(pg.item()),
                      "demo_frac": float(demo.float().mean().item()) if len(demo) else 0.0})
        return w * nll + (1.0 - w) * pg, stats


@hookimpl
def rlctl_register_samplers(register):
    register("mixed", MixedSampler)


@hookimpl
def rlctl_register_losses(register):
    register("mixed", MixedLoss)


@hookimpl
def rlctl_register_schedulers(register):
    register("sft_rl_mix", SFTRLMixSchedule)
