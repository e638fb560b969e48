"""Off-policy policy gradient with importance-sampling corrections against the sampler's behaviour
policy mu (``behavior_logprobs``): the bias-mitigation modes used with Nested-ReFT (``plugins/nested.py``).

Loss ``nested_is``. Per completion token t with advantage A_t, the PPO ratio r_t = pi_theta / pi_old and
the behaviour ratio rho_t = pi_old(y_t) / mu(y_t), the per-token loss is

    -w_t * min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t)        (clip = true)
    -w_t * r_t A_t                                                          (clip = false)

aggregated over tokens by ``aggregation`` (``rlctl.ops.aggregate``). w_t is a constant (no gradient)
from ``correction``. This is the decoupled PPO objective (Hilton et al. 2022, "Batch size-invariance for
policy optimization"): the clip keeps pi_theta close to pi_old, the policy before this batch's updates,
and w_t corrects for the completions having been sampled from mu instead of pi_old. On the first update
pi_theta = pi_old, so the gradient is w_t A_t grad log pi_theta(y_t): with w = rho it is the importance-
sampled policy gradient (pi_theta / mu) A grad log pi_theta.
"""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.ops import kl_penalty, masked_mean
from rlctl.rollouts import Rollouts
from rlctl_plugins.policy_loss import ClippedPolicyLoss

CORRECTIONS = ("none", "token", "sequence", "truncated", "retrace")
SEQUENCE_LOG_CAP = 30.0  # log of the largest sequence weight (e^30 ~ 1e13): keeps the loss finite


def importance_weights(log_rho: torch.Tensor, mask: torch.Tensor, correction: str, cap: float = 2.0,
                       lam: float = 1.0) -> torch.Tensor:
    """Per-token weights w [N, T] from log rho_t = log pi_old(y_t) - log mu(y_t); zero on padding.

    none       w_t = 1
    token      w_t = rho_t
    sequence   w_t = prod_{s in seq} rho_s          (the same weight on every token of a completion)
    truncated  w_t = min(rho_t, cap)
    retrace    w_t = prod_{s <= t} c_s,  c_s = lam * min(1, rho_s)
    """
    m = mask.to(log_rho.dtype)
    log_rho = log_rho * m
    if correction == "none":
        w = torch.ones_like(log_rho)
    elif correction == "token":
        w = log_rho.exp()
    elif correction == "truncated":
        w = log_rho.exp().clamp(max=cap)
    elif correction == "sequence":
        w = log_rho.sum(-1, keepdim=True).clamp(max=SEQUENCE_LOG_CAP).exp().expand_as(log_rho)
    elif correction == "retrace":
        trace = lam * log_rho.exp().clamp(max=1.0)
        w = torch.where(m > 0, trace, torch.ones_like(trace)).cumprod(dim=-1)
    else:
        raise ValueError(f"correction = {correction!r}: accepted values are {', '.join(CORRECTIONS)}")
    return w * m


def effective_sample_size(weights: torch.Tensor) -> float:
    """(sum w)^2 / (n sum w^2) of a flat set of weights: 1 when all are equal, 1/n when one dominates."""
    if weights.numel() == 0:
        return 1.0
    total_sq = (weights**2).sum()
    if total_sq <= 0:
        return 0.0
    return float((weights.sum() ** 2 / (weights.numel() * total_sq)).item())


class NestedISLoss(ClippedPolicyLoss):
    """Policy gradient on samples of a behaviour policy mu with an importance correction w_t:

        loss_t = -w_t * min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t),  r_t = pi_theta / pi_old

    (``clip = false``: -w_t r_t A_t), w_t a constant computed from rho_t = pi_old(y_t) / mu(y_t):

    ``none``       w_t = 1: treat the samples as on-policy (biased; the baseline of the comparison).
    ``token``      w_t = rho_t: per-token importance sampling. Corrects the distribution of the token's own
                   decision; unbiased for grad E_pi[R] when each term depends on one decision (a single-step
                   policy), in general it leaves the mu-distribution of the prefix and of the rest of the
                   completion uncorrected (the usual per-token ratio of PPO-style objectives).
    ``sequence``   w_t = prod_s rho_s over all completion tokens: sequence-level importance sampling,
                   E_mu[prod rho * f(y)] = E_pi[f(y)], so unbiased for grad E_pi[R]; the variance grows
                   with the completion length (log-weight capped at 30 only to keep the loss finite).
    ``truncated``  w_t = min(rho_t, cap): truncated IS (Ionides 2008, "Truncated importance sampling";
                   as in IMPALA's V-trace): bounded variance, biased whenever rho_t > cap. Equals
                   ``ppo_clip`` with ``tis_cap = cap``.
    ``retrace``    w_t = prod_{s <= t} c_s with the Retrace(lambda) trace c_s = lam * min(1, rho_s) (Munos et
                   al. 2016, "Safe and Efficient Off-Policy Reinforcement Learning", eq. 4): the product of
                   the traces of the completion up to and including token t, so a token's term is cut as
                   soon as the behaviour model over-sampled an earlier token (rho_s < 1), and never
                   amplified (w_t <= lam^t <= 1). The single-step form lam * min(1, rho_t) is ``truncated``
                   with cap 1 scaled by the constant lam (a learning-rate factor), so it is not separate.
                   With lam < 1 the weights decay as lam^t along long completions: lam = 1 is the default.

    ``cap`` applies to ``truncated`` only, ``lam`` to ``retrace`` only. ``kl_coef`` / ``entropy_coef`` add
    a KL penalty to the reference model and an entropy bonus as ``ppo_clip`` does (not importance-weighted).

    Statistics: ``is_ratio_mean`` and ``is_ratio_max`` of rho_t over completion tokens; ``is_weight_mean``
    of w_t; ``ess`` = (sum w)^2 / (n sum w^2) over the n completion tokens (over the n completions for
    ``sequence``): 1 when on-policy, small when few samples carry the weight; ``skipped_layers``, the mean
    number of skipped blocks, when the sampler records ``info["skipped_layers"]`` (the ``nested`` sampler).
    """

    def __init__(self, correction: str = "truncated", cap: float = 2.0, lam: float = 1.0, clip: bool = True,
                 clip_low: float = 0.2, clip_high: float | None = None, aggregation: str = "token-mean",
                 normalizer: float | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
                 entropy_coef: float = 0.0, dual_clip: float = 0.0):
        if correction not in CORRECTIONS:
            raise ValueError(f"correction = {correction!r}: accepted values are {', '.join(CORRECTIONS)}")
        if cap <= 0:
            raise ValueError(f"cap = {cap}: must be > 0")
        if not 0 < lam <= 1:
            raise ValueError(f"lam = {lam}: must be in (0, 1]")
        if not clip:  # the surrogate without the trust region: clamp(r, -inf, inf) = r
            clip_low, clip_high = float("inf"), float("inf")
        # the parent computes the clipped surrogate only; KL and entropy terms are added unweighted below
        super().__init__(clip_low, clip_high, aggregation, normalizer, kl_coef=0.0, kl_estimator=kl_estimator,
                         entropy_coef=0.0, ratio_level="token", dual_clip=dual_clip, tis_cap=0.0)
        self.correction = correction
        self.cap = cap
        self.lam = lam
        self.clip = clip
        self.is_kl_coef = kl_coef
        self.is_entropy_coef = entropy_coef

    @property
    def requires(self) -> tuple[str, ...]:
        needs = ["behavior_logprobs", "advantages", "old_logprobs"]
        if self.is_kl_coef:
            needs.append("ref_logprobs")
        if self.is_entropy_coef:
            needs.append("entropy")
        return tuple(needs)

    def weights(self, rollouts: Rollouts) -> tuple[torch.Tensor, dict[str, float]]:
        """The correction w [N, T] (no gradient) and its statistics."""
        if rollouts.behavior_logprobs is None:
            raise ValueError("nested_is needs the sampler's log-probs (rollouts.behavior_logprobs); use a "
                             "sampler that records them, e.g. 'nested'")
        mask = rollouts.completion_mask
        keep = mask > 0
        log_rho = (rollouts.old_logprobs - rollouts.behavior_logprobs).detach().float()
        w = importance_weights(log_rho, mask, self.correction, self.cap, self.lam)
        rho = log_rho.exp()[keep]
        if self.correction == "sequence":
            ess = effective_sample_size(w[:, 0][keep.any(-1)])
        else:
            ess = effective_sample_size(w[keep])
        stats = {
            "is_ratio_mean": float(rho.mean().item()) if rho.numel() else 1.0,
            "is_ratio_max": float(rho.max().item()) if rho.numel() else 1.0,
            "is_weight_mean": masked_mean(w, mask).item(),
            "ess": ess,
        }
        skipped = [len(i["skipped_layers"]) for i in rollouts.info if "skipped_layers" in i]
        if skipped:
            stats["skipped_layers"] = sum(skipped) / len(skipped)
        return w, stats

    def policy_terms(self, rollouts: Rollouts, logprobs: torch.Tensor, entropy: torch.Tensor | None,
                     mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        surrogate, stats = super().policy_terms(rollouts, logprobs, None, mask)
        w, w_stats = self.weights(rollouts)
        per_token = surrogate * w.to(surrogate.dtype)
        stats.update(w_stats)
        if self.is_kl_coef:
            kl = kl_penalty(logprobs, rollouts.ref_logprobs, self.kl_estimator)
            per_token = per_token + self.is_kl_coef * kl
            stats["kl"] = masked_mean(kl.detach(), mask).item()
        if self.is_entropy_coef:
            per_token = per_token - self.is_entropy_coef * entropy
            stats["entropy"] = masked_mean(entropy.detach(), mask).item()
        return per_token, stats


@hookimpl
def rlctl_register_losses(register):
    register("nested_is", NestedISLoss)
