"""More pairwise preference losses (the menu of TRL's DPO trainer), on the ``pairs`` sampler's batches.

Notation as in ``preference.py``: for a pair (w chosen, l rejected), ρ_w = log π(w) - log π_ref(w),
ρ_l = log π(l) - log π_ref(l) (summed token log-probs), h = ρ_w - ρ_l, implicit rewards r = β ρ. Every
loss is averaged over pairs (``totals["pairs"]``) and, except ``aot``, takes ``wpo`` (WPO pair weights,
see ``preference.py``).

==============  =====================================================================================
hinge           max(0, 1 - β h)                           (``reference_free``: h = log π(w) - log π(l))
nca_pair        -log σ(r_w) - ½ log σ(-r_w) - ½ log σ(-r_l)
bco_pair        -log σ(r_w - δ) - log σ(-(r_l - δ)),      δ = running mean of the implicit rewards
apo_zero        (1 - σ(r_w)) + σ(r_l)
apo_down        σ(r_w) + (1 - σ(β h))
discopop        (1 - m) (-log σ(β h)) + m exp(-β h),      m = σ(β h / τ)
sppo_hard       (ρ_w - 1/(2β))² + (ρ_l + 1/(2β))²
aot             -log σ(β Δ), Δ from sorted margins across the batch (``paired``, see the class)
==============  =====================================================================================
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rlctl.hookspecs import hookimpl
from rlctl.rollouts import Rollouts
from rlctl_plugins.preference import PairLogps, PairLoss, _check_beta, pair_logps


class _ReferencePairLoss(PairLoss):
    """A pairwise loss on the reference log-ratios; subclasses define ``losses(lp) -> [pairs]``."""

    requires: tuple[str, ...] = ("ref_logprobs",)

    def __init__(self, beta: float = 0.1, wpo: bool = False):
        _check_beta(beta)
        self.beta = beta
        self.wpo = wpo

    def losses(self, lp: PairLogps) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, rollouts: Rollouts, logprobs: torch.Tensor,
                **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        lp = pair_logps(rollouts, logprobs, with_ref=bool(self.requires))
        stats = lp.reference_stats(self.beta) if lp.ref_w is not None else {}
        return self.reduce(self.losses(lp), lp, rollouts, stats), stats


class HingeLoss(_ReferencePairLoss):
    """Hinge loss on the reference-normalised margin, max(0, 1 - β h) (RSO, "Statistical Rejection Sampling
    Improves Preference Optimization"; TRL's ``hinge``). ``reference_free = true`` gives SLiC-HF's original
    calibration loss, max(0, 1 - β (log π(w) - log π(l))), i.e. margin δ = 1/β, with no reference model.
    At π = π_ref the loss is 1."""

    paper = "Statistical Rejection Sampling Improves Preference Optimization"

    def __init__(self, beta: float = 0.1, reference_free: bool = False, wpo: bool = False):
        super().__init__(beta, wpo)
        self.reference_free = reference_free

    @property
    def requires(self) -> tuple[str, ...]:  # type: ignore[override]
        return () if self.reference_free else ("ref_logprobs",)

    def losses(self, lp: PairLogps) -> torch.Tensor:
        h = lp.policy_w - lp.policy_l if self.reference_free else lp.log_ratio_margin
        return torch.relu(1 - self.beta * h)


class NCAPairLoss(_ReferencePairLoss):
    """NCA ("Noise Contrastive Alignment of Language Models with Explicit Rewards"), pairwise form:
    -log σ(r_w) - ½ log σ(-r_w) - ½ log σ(-r_l). Optimises absolute likelihoods, so the chosen log-prob
    does not fall as in DPO. At π = π_ref the loss is 2 log 2 = 1.386."""

    paper = "Noise Contrastive Alignment of Language Models with Explicit Rewards"

    def losses(self, lp: PairLogps) -> torch.Tensor:
        rw, rl = self.beta * lp.chosen_log_ratio, self.beta * lp.rejected_log_ratio
        return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


class BCOPairLoss(_ReferencePairLoss):
    """BCO ("Binary Classifier Optimization for Large Language Model Alignment") on pairs: a binary
    classifier with logit r - δ, chosen as positive and rejected as negative:
    -log σ(r_w - δ) - log σ(-(r_l - δ)).

    δ is the running mean of all implicit rewards (chosen and rejected) seen so far, updated with each
    batch before it is used (as TRL does); it is saved in checkpoints. Each process keeps its own δ over
    the pairs it sees. At π = π_ref (δ = 0) the loss is 2 log 2."""

    paper = "Binary Classifier Optimization for Large Language Model Alignment"

    def __init__(self, beta: float = 0.1, wpo: bool = False):
        super().__init__(beta, wpo)
        self.delta, self.count = 0.0, 0.0

    def update_delta(self, rewards: torch.Tensor) -> float:
        n = float(rewards.numel())
        if n:
            self.delta += (float(rewards.sum().item()) - n * self.delta) / (self.count + n)
            self.count += n
        return self.delta

    def losses(self, lp: PairLogps) -> torch.Tensor:
        rw, rl = self.beta * lp.chosen_log_ratio, self.beta * lp.rejected_log_ratio
        delta = self.update_delta(torch.cat([rw, rl]).detach())
        return -F.logsigmoid(rw - delta) - F.logsigmoid(-(rl - delta))

    def compute(self, rollouts: Rollouts, logprobs: torch.Tensor,
                **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        loss, stats = super().compute(rollouts, logprobs, **extra)
        stats["bco_delta"] = self.delta
        return loss, stats

    def state_dict(self) -> dict[str, float]:
        return {"delta": self.delta, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.delta, self.count = float(state.get("delta", 0.0)), float(state.get("count", 0.0))


class APOZeroLoss(_ReferencePairLoss):
    """APO-zero ("Anchored Preference Optimization and Contrastive Revisions"): (1 - σ(r_w)) + σ(r_l): raise
    the chosen likelihood and lower the rejected one, each against the reference. For data whose chosen
    answers are better than the model's own. At π = π_ref the loss is 1."""

    paper = "Anchored Preference Optimization and Contrastive Revisions: Addressing Underspecification in Alignment"

    def losses(self, lp: PairLogps) -> torch.Tensor:
        return (1 - torch.sigmoid(self.beta * lp.chosen_log_ratio)) + torch.sigmoid(self.beta * lp.rejected_log_ratio)


class APODownLoss(_ReferencePairLoss):
    """APO-down (same paper): σ(r_w) + (1 - σ(β h)): lower both likelihoods, the rejected one more. For data
    whose chosen answers are worse than the model's own. At π = π_ref the loss is 1."""

    paper = APOZeroLoss.paper

    def losses(self, lp: PairLogps) -> torch.Tensor:
        return torch.sigmoid(self.beta * lp.chosen_log_ratio) + (1 - torch.sigmoid(self.beta * lp.log_ratio_margin))


class DiscoPOPLoss(_ReferencePairLoss):
    """DiscoPOP ("Discovering Preference Optimization Algorithms with and for Large Language Models"), the
    log-ratio modulated loss: with x = β h and m = σ(x / τ), (1 - m) (-log σ(x)) + m exp(-x). Blends the
    logistic (DPO) and exponential losses by the sign and size of the margin. ``tau`` = 0.05 (the paper's
    and TRL's). At π = π_ref the loss is (log 2 + 1) / 2 = 0.847."""

    paper = "Discovering Preference Optimization Algorithms with and for Large Language Models"

    def __init__(self, beta: float = 0.1, tau: float = 0.05, wpo: bool = False):
        super().__init__(beta, wpo)
        if tau <= 0:
            raise ValueError(f"tau = {tau}: accepted values are > 0")
        self.tau = tau

    def losses(self, lp: PairLogps) -> torch.Tensor:
        x = self.beta * lp.log_ratio_margin
        m = torch.sigmoid(x / self.tau)
        return (1 - m) * -F.logsigmoid(x) + m * torch.exp(-x)


class SPPOHardLoss(_ReferencePairLoss):
    """SPPO ("Self-Play Preference Optimization for Language Model Alignment") with hard win probabilities
    (P = 1 for the chosen, 0 for the rejected): (ρ_w - η/2)² + (ρ_l + η/2)² with η = 1/β, as in TRL's
    ``sppo_hard``. The paper estimates soft probabilities with a preference model; the hard version needs
    only the labels. At π = π_ref the loss is 2 (1/(2β))²."""

    paper = "Self-Play Preference Optimization for Language Model Alignment"

    def losses(self, lp: PairLogps) -> torch.Tensor:
        half = 0.5 / self.beta
        return (lp.chosen_log_ratio - half) ** 2 + (lp.rejected_log_ratio + half) ** 2


class AOTLoss(_ReferencePairLoss):
    """AOT ("Distributional Preference Alignment of LLMs via Optimal Transport"): first-order stochastic
    dominance of the chosen over the rejected reward distribution, through sorting across the batch:
    -log σ(β Δ_k) for the k-th order statistics.

    ``paired = true`` (for paired data; TRL's ``aot``): Δ = sort(log π(w) - log π(l)) - sort(log π_ref(w) -
    log π_ref(l)). ``paired = false`` (for unpaired data; TRL's ``aot_pair``): Δ = sort(ρ_w) - sort(ρ_l).
    Sorting couples the pairs of one (micro-)batch: the loss depends on which pairs share it. With one
    pair, ``paired`` AOT is DPO. No ``wpo`` key: after sorting, a term no longer belongs to one pair."""

    paper = "Distributional Preference Alignment of LLMs via Optimal Transport"

    def __init__(self, beta: float = 0.1, paired: bool = True):
        super().__init__(beta, wpo=False)
        self.paired = paired

    def losses(self, lp: PairLogps) -> torch.Tensor:
        if self.paired:
            delta = torch.sort(lp.policy_w - lp.policy_l).values - torch.sort(lp.ref_w - lp.ref_l).values
        else:
            delta = torch.sort(lp.chosen_log_ratio).values - torch.sort(lp.rejected_log_ratio).values
        return -F.logsigmoid(self.beta * delta)


@hookimpl
def rlctl_register_losses(register):
    register("hinge", HingeLoss)
    register("nca_pair", NCAPairLoss)
    register("bco_pair", BCOPairLoss)
    register("apo_zero", APOZeroLoss)
    register("apo_down", APODownLoss)
    register("discopop", DiscoPOPLoss)
    register("sppo_hard", SPPOHardLoss)
    register("aot", AOTLoss)
