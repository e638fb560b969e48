"""Clipped policy-gradient surrogates: PPO / GRPO / DAPO clip-higher, dual-clip, truncated importance
sampling, GSPO's sequence-level ratio and NGRPO's asymmetric clipping, with optional KL and entropy terms.
"""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.ops import AGGREGATIONS, KL_ESTIMATORS, aggregate, kl_penalty, masked_mean
from rlctl.rollouts import Rollouts
from rlctl_plugins.behavior_correction import BehaviorCorrection
from rlctl_plugins.kl_control import make_controller

RATIO_LEVELS = ("token", "sequence")


class ClippedPolicyLoss:
    """PPO ("Proximal Policy Optimization Algorithms"): per token

        -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A),   rho = pi / pi_old,

    aggregated over tokens by ``aggregation`` (see ``rlctl.ops.aggregate``). For A > 0 only the upper
    bound can bind and for A < 0 only the lower one, so ``clip_high > clip_low`` is DAPO's clip-higher.

    ``ratio_level = "sequence"``: GSPO's rho_i = exp(mean_t log pi/pi_old) over the sequence's tokens,
    clipped per sequence (see the ``gspo`` loss).
    ``dual_clip`` = c > 1 (0 = off): for A < 0 the loss is capped at -c A ("Mastering Complex Control in
    MOBA Games with Deep Reinforcement Learning").
    ``tis_cap`` = C > 0 (0 = off): truncated importance sampling; the surrogate is weighted by
    min(pi_old / mu, C) with mu the sampler's log-probs (``behavior_logprobs``), correcting a mismatch
    between the generation engine and the trainer. ``tis_level = "sequence"`` truncates each sequence's
    product of ratios instead; ``mask_low`` / ``mask_high`` drop tokens whose ratio leaves that range
    (masked IS, IcePop). See ``behavior_correction.py``.
    ``kl_coef`` > 0 adds ``kl_coef * KL(pi || pi_ref)`` per token with estimator k1, k2, k3 or the
    straight-through k1+ / k3+ (needs a reference model); ``kl_target`` > 0 adapts ``kl_coef`` after every
    step toward that KL over ``kl_horizon`` completions (see ``kl_control.py``). ``entropy_coef`` > 0
    rewards entropy (a bonus), < 0 penalises it.

    Subclasses change the policy-gradient term by overriding ``surrogate``; the KL, entropy and
    behaviour-correction terms apply to every one of them.
    """

    paper = "Proximal Policy Optimization Algorithms"

    def __init__(self, clip_low: float = 0.2, clip_high: float | None = None,
                 aggregation: str = "token-mean", normalizer: float | None = None,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0,
                 ratio_level: str = "token", dual_clip: float = 0.0, tis_cap: float = 0.0,
                 tis_level: str = "token", mask_low: float = 0.0, mask_high: float = 0.0,
                 kl_target: float = 0.0, kl_horizon: float = 10000.0):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation = {aggregation!r}: accepted values are {', '.join(AGGREGATIONS)}")
        if aggregation == "constant" and not normalizer:
            raise ValueError("aggregation = 'constant' needs normalizer (e.g. max_new_tokens)")
        if clip_low < 0 or (clip_high is not None and clip_high < 0):
            raise ValueError("clip_low and clip_high must be >= 0")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator = {kl_estimator!r}: accepted values are {', '.join(KL_ESTIMATORS)}")
        if ratio_level not in RATIO_LEVELS:
            raise ValueError(f"ratio_level = {ratio_level!r}: accepted values are {', '.join(RATIO_LEVELS)}")
        if dual_clip and dual_clip <= 1:
            raise ValueError(f"dual_clip = {dual_clip}: accepted values are 0 (off) or > 1")
        self.behavior_correction = BehaviorCorrection(tis_cap, tis_level, mask_low, mask_high)
        self.clip_low = clip_low
        self.clip_high = clip_low if clip_high is None else clip_high
        self.aggregation = aggregation
        self.normalizer = normalizer
        if kl_coef < 0:
            raise ValueError(f"kl_coef = {kl_coef}: accepted values are >= 0")
        self.kl_controller = make_controller(kl_coef, kl_target, kl_horizon)
        self._kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.entropy_coef = entropy_coef
        self.ratio_level = ratio_level
        self.dual_clip = dual_clip
        self.tis_cap = tis_cap

    @property
    def kl_coef(self) -> float:
        """The KL coefficient of the next update (adapted after every step when ``kl_target`` is set)."""
        return self.kl_controller.value if self.kl_controller is not None else self._kl_coef

    @kl_coef.setter
    def kl_coef(self, value: float) -> None:
        if self.kl_controller is not None:
            self.kl_controller.value = float(value)
        self._kl_coef = value

    def state_dict(self) -> dict[str, float]:
        return self.kl_controller.state_dict() if self.kl_controller is not None else {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if self.kl_controller is not None:
            self.kl_controller.load_state_dict(state)

    @property
    def requires(self) -> tuple[str, ...]:
        needs = ["advantages", "old_logprobs"]
        if self.kl_coef:
            needs.append("ref_logprobs")
        if self.entropy_coef:
            needs.append("entropy")
        if self.behavior_correction.active:
            needs.append("behavior_logprobs")
        return tuple(needs)

    def surrogate(self, rollouts: Rollouts, logprobs: torch.Tensor,
                  mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The per-token policy-gradient loss [N, T] and its statistics: the clipped surrogate here."""
        adv = rollouts.advantages
        log_ratio = logprobs - rollouts.old_logprobs
        if self.ratio_level == "sequence":
            log_ratio = masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1).expand_as(logprobs)
        ratio = torch.exp(log_ratio)
        unclipped = -ratio * adv
        clipped = -torch.clamp(ratio, 1 - self.clip_low, 1 + self.clip_high) * adv
        per_token = torch.maximum(unclipped, clipped)
        stats = {
            "clip_frac": masked_mean((clipped > unclipped).float(), mask).item(),
            "ratio_mean": masked_mean(ratio.detach(), mask).item(),
        }
        if self.dual_clip:
            cap = -self.dual_clip * adv
            capped = (adv < 0) & (per_token > cap)
            per_token = torch.where(capped, cap, per_token)
            stats["dual_clip_frac"] = masked_mean(capped.float(), mask).item()
        return per_token, stats

    def policy_terms(self, rollouts: Rollouts, logprobs: torch.Tensor, entropy: torch.Tensor | None,
                     mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The per-token policy loss [N, T] (surrogate + KL + entropy terms) and its statistics."""
        per_token, stats = self.surrogate(rollouts, logprobs, mask)
        if self.behavior_correction.active:
            weight, correction_stats = self.behavior_correction.weights(rollouts, mask)
            per_token = per_token * weight
            stats.update(correction_stats)
        if self.kl_coef:
            kl = kl_penalty(logprobs, rollouts.ref_logprobs, self.kl_estimator)
            per_token = per_token + self.kl_coef * kl
            stats["kl"] = masked_mean(kl.detach(), mask).item()
            if self.kl_controller is not None:
                stats["kl_coef"] = self.kl_coef
        if self.entropy_coef:
            per_token = per_token - self.entropy_coef * entropy
            stats["entropy"] = masked_mean(entropy.detach(), mask).item()
        return per_token, stats

    def compute(self, rollouts: Rollouts, logprobs: torch.Tensor, entropy: torch.Tensor | None = None,
                **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        mask = rollouts.loss_mask if rollouts.loss_mask is not None else rollouts.completion_mask
        per_token, stats = self.policy_terms(rollouts, logprobs, entropy, mask)
        loss = aggregate(per_token, mask, self.aggregation, self.normalizer, rollouts.totals)
        return loss, stats


class GSPOLoss(ClippedPolicyLoss):
    """GSPO ("Group Sequence Policy Optimization"): the clipped surrogate with the sequence-level ratio

        s_i = exp(mean_t (log pi - log pi_old)),  loss_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i)

    averaged over sequences (seq-mean-token-mean). The paper's clip ranges are tiny (3e-4, 4e-4) because
    a sequence ratio moves far less than a token ratio. Other options as ``ppo_clip``.
    """

    paper = "Group Sequence Policy Optimization"

    def __init__(self, clip_low: float = 3e-4, clip_high: float | None = 4e-4,
                 aggregation: str = "seq-mean-token-mean", normalizer: float | None = None,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0,
                 dual_clip: float = 0.0, tis_cap: float = 0.0, tis_level: str = "token",
                 mask_low: float = 0.0, mask_high: float = 0.0, kl_target: float = 0.0,
                 kl_horizon: float = 10000.0):
        super().__init__(clip_low, clip_high, aggregation, normalizer, kl_coef, kl_estimator, entropy_coef,
                         ratio_level="sequence", dual_clip=dual_clip, tis_cap=tis_cap, tis_level=tis_level,
                         mask_low=mask_low, mask_high=mask_high, kl_target=kl_target, kl_horizon=kl_horizon)


class NGRPOClipLoss(ClippedPolicyLoss):
    """NGRPO's asymmetric clipping ("NGRPO: Negative-enhanced Group Relative Policy Optimization").

    Looser updates for positive advantages, stricter for negative ones: for A > 0 the ratio is capped at
    1 + clip_high (0.24), for A < 0 floored at 1 - clip_low (0.16) — the authors' settings. Pair with the
    ``ngrpo`` advantage. Other options as ``ppo_clip``.
    """

    paper = "NGRPO: Negative-enhanced Group Relative Policy Optimization"

    def __init__(self, clip_low: float = 0.16, clip_high: float | None = 0.24,
                 aggregation: str = "token-mean", normalizer: float | None = None,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0,
                 ratio_level: str = "token", dual_clip: float = 0.0, tis_cap: float = 0.0,
                 kl_target: float = 0.0, kl_horizon: float = 10000.0):
        super().__init__(clip_low, clip_high, aggregation, normalizer, kl_coef, kl_estimator, entropy_coef,
                         ratio_level, dual_clip, tis_cap, kl_target=kl_target, kl_horizon=kl_horizon)


@hookimpl
def rlctl_register_losses(register):
    register("ppo_clip", ClippedPolicyLoss)
    register("gspo", GSPOLoss)
    register("ngrpo_clip", NGRPOClipLoss)
