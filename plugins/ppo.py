"""PPO with a value head: GAE advantages (with truncated-response EGAE and an optional per-token KL
penalty in the reward) and the clipped policy + clipped value loss.

Layout: ``rollouts.values[:, t]`` is V(s_t), the value of the state before completion token t (the value
head on the same hidden state whose logits score token t); the state after the last token is terminal
(value 0) unless the response was truncated and ``bootstrap_truncated`` is set.
"""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.ops import KL_ESTIMATORS, aggregate, kl_penalty, masked_mean, masked_whiten
from rlctl.rollouts import Rollouts
from rlctl_plugins.kl_control import make_controller
from rlctl_plugins.policy_loss import ClippedPolicyLoss


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
        bootstrap: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation ("High-Dimensional Continuous Control Using Generalized Advantage
    Estimation") over right-padded rows: delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam
    A_{t+1}, returns = A + V. ``bootstrap`` [N] is V after each row's last token (0 = terminal).
    Returns (advantages, returns), zero on padding.
    """
    m = mask.to(torch.float32)
    r = rewards.to(torch.float32) * m
    v = values.to(torch.float32) * m
    next_v = torch.zeros_like(v)
    next_v[:, :-1] = v[:, 1:]
    if bootstrap is not None:
        last = (m.sum(-1).long() - 1).clamp(min=0)
        next_v[torch.arange(v.shape[0], device=v.device), last] = bootstrap.to(v) * (m.sum(-1) > 0)
    delta = (r + gamma * next_v - v) * m
    adv = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        running = delta[:, t] + gamma * lam * running  # padding deltas are 0
        adv[:, t] = running
    adv = adv * m
    return adv, (adv + v) * m


def truncated_rows(rollouts: Rollouts) -> torch.Tensor:
    """[N] bool: responses cut by the length budget rather than ended by EOS.

    ``info[i]["truncated"]`` decides when present. Otherwise a row is truncated when it fills the full
    width T and its last token is not one that the shorter (EOS-terminated) rows end with; when no row
    is shorter, every full-width row counts as truncated.
    """
    mask = rollouts.completion_mask
    lengths = mask.sum(-1).long()
    width = mask.shape[1]
    ids = rollouts.completion_ids
    rows = torch.arange(len(lengths), device=ids.device)
    last_token = ids[rows, (lengths - 1).clamp(min=0)]
    ended = (lengths < width) & (lengths > 0)
    eos = torch.unique(last_token[ended])
    guess = (lengths == width) & ~torch.isin(last_token, eos)
    flags = [bool(info["truncated"]) if isinstance(info, dict) and "truncated" in info else bool(g)
             for info, g in zip(rollouts.info or [{}] * len(lengths), guess.tolist())]
    return torch.tensor(flags, dtype=torch.bool, device=mask.device)


class GAEAdvantage:
    """GAE advantages and returns for PPO with a value head; sets ``rollouts.returns`` for the value loss.

    Token rewards: an outcome reward [N] is placed on the last completion token (a process reward [N, T]
    is used as is), minus ``kl_coef * KL(pi_old || pi_ref)`` on every token when ``kl_coef`` > 0 — the
    per-token KL penalty of RLHF and ReFT ("ReFT: Reasoning with Reinforced Fine-Tuning"; estimator
    ``kl_estimator``, default k1 = log pi_old / pi_ref). ``kl_target`` > 0 makes the coefficient adaptive:
    after each batch it moves toward the coefficient that keeps the KL at ``kl_target`` over ``kl_horizon``
    completions (see ``kl_control.py``); the coefficient used is logged as ``reward_kl_coef``.
    ``bootstrap_truncated``: EGAE ("Truncated Proximal Policy Optimization"): a response cut by the length
    budget is not terminal; its last step bootstraps from the value at the cut (the last value the head
    produced for the row) instead of 0. Complete responses get plain GAE. Truncation comes from
    ``info["truncated"]`` when the sampler records it, else from the mask (see ``truncated_rows``).
    ``whiten``: normalise advantages over all completion tokens of the batch (population std unless
    ``unbiased_std``); returns are never whitened.
    """

    def __init__(self, gamma: float = 1.0, lam: float = 0.95, whiten: bool = True, kl_coef: float = 0.0,
                 kl_estimator: str = "k1", bootstrap_truncated: bool = False, unbiased_std: bool = False,
                 eps: float = 1e-6, kl_target: float = 0.0, kl_horizon: float = 10000.0):
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma = {gamma}: accepted values are in [0, 1]")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam = {lam}: accepted values are in [0, 1]")
        if kl_coef < 0:
            raise ValueError(f"kl_coef = {kl_coef}: accepted values are >= 0")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator = {kl_estimator!r}: accepted values are {', '.join(KL_ESTIMATORS)}")
        self.kl_controller = make_controller(kl_coef, kl_target, kl_horizon)
        self.gamma = gamma
        self.lam = lam
        self.whiten = whiten
        self._kl_coef = kl_coef
        self.kl_estimator = kl_estimator
        self.bootstrap_truncated = bootstrap_truncated
        self.unbiased_std = unbiased_std
        self.eps = eps

    @property
    def kl_coef(self) -> float:
        """The coefficient of the KL in the reward for the next batch."""
        return self.kl_controller.value if self.kl_controller is not None else self._kl_coef

    def state_dict(self) -> dict[str, float]:
        return self.kl_controller.state_dict() if self.kl_controller is not None else {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if self.kl_controller is not None:
            self.kl_controller.load_state_dict(state)

    @property
    def requires(self) -> tuple[str, ...]:
        needs = ("rewards", "values")
        return needs + ("ref_logprobs", "old_logprobs") if self.kl_coef else needs

    def token_rewards(self, rollouts: Rollouts) -> torch.Tensor:
        mask = rollouts.completion_mask.to(torch.float32)
        r = rollouts.rewards.to(torch.float32)
        if r.dim() == 1:
            lengths = mask.sum(-1).long()
            rows = torch.arange(len(r), device=r.device)
            placed = torch.zeros_like(mask)
            placed[rows, (lengths - 1).clamp(min=0)] = r * (lengths > 0)
            r = placed
        r = r * mask
        if self.kl_coef:
            kl = kl_penalty(rollouts.old_logprobs.float(), rollouts.ref_logprobs.float(), self.kl_estimator)
            r = r - self.kl_coef * kl * mask
            mean_kl = float(masked_mean(kl, mask))
            self.last_stats = {"kl": mean_kl}  # logged as metric "kl"
            if self.kl_controller is not None:
                # this batch used the current coefficient; the next one gets the updated value (the batch
                # is the same on every process, so the coefficient stays in sync)
                self.last_stats["reward_kl_coef"] = self.kl_controller.value
                self.kl_controller.update(mean_kl, float(len(rollouts)))
        return r

    def compute(self, rollouts: Rollouts) -> torch.Tensor:
        mask = rollouts.completion_mask
        values = rollouts.values.detach().to(torch.float32)
        bootstrap = None
        if self.bootstrap_truncated:
            lengths = mask.sum(-1).long()
            at_cut = values[torch.arange(len(lengths), device=values.device), (lengths - 1).clamp(min=0)]
            bootstrap = torch.where(truncated_rows(rollouts).to(values.device), at_cut, torch.zeros_like(at_cut))
        adv, returns = gae(self.token_rewards(rollouts), values, mask, self.gamma, self.lam, bootstrap)
        rollouts.returns = returns
        if self.whiten:
            adv = masked_whiten(adv, mask, self.unbiased_std, self.eps)
        return adv


class PPOLoss(ClippedPolicyLoss):
    """PPO with a value head: the ``ppo_clip`` surrogate + ``vf_coef`` * clipped value loss

        0.5 * max((V - R)^2, (V_old + clip(V - V_old, -value_clip, value_clip) - R)^2)

    per token, aggregated like the policy loss. R = ``rollouts.returns`` (set by the ``gae`` advantage),
    V = the new values (``values=``), V_old = ``rollouts.values``. ``value_clip = 0`` disables clipping.
    Other options as ``ppo_clip``.
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float | None = None,
                 aggregation: str = "token-mean", normalizer: float | None = None,
                 kl_coef: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0,
                 ratio_level: str = "token", dual_clip: float = 0.0, tis_cap: float = 0.0,
                 vf_coef: float = 0.1, value_clip: float = 0.2, kl_target: float = 0.0,
                 kl_horizon: float = 10000.0):
        super().__init__(clip_low, clip_high, aggregation, normalizer, kl_coef, kl_estimator, entropy_coef,
                         ratio_level, dual_clip, tis_cap, kl_target=kl_target, kl_horizon=kl_horizon)
        if vf_coef < 0:
            raise ValueError(f"vf_coef = {vf_coef}: accepted values are >= 0")
        if value_clip < 0:
            raise ValueError(f"value_clip = {value_clip}: accepted values are 0 (off) or > 0")
        self.vf_coef = vf_coef
        self.value_clip = value_clip

    @property
    def requires(self) -> tuple[str, ...]:
        return super().requires + ("values",)

    def compute(self, rollouts: Rollouts, logprobs: torch.Tensor, entropy: torch.Tensor | None = None,
                values: torch.Tensor | None = None, **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if values is None or rollouts.returns is None or rollouts.values is None:
            raise ValueError("the ppo loss needs values= (new values), rollouts.values and rollouts.returns; "
                             "use it with the 'gae' advantage")
        mask = rollouts.loss_mask if rollouts.loss_mask is not None else rollouts.completion_mask
        per_token, stats = self.policy_terms(rollouts, logprobs, entropy, mask)
        policy_loss = aggregate(per_token, mask, self.aggregation, self.normalizer, rollouts.totals)
        returns, old = rollouts.returns.to(values.dtype), rollouts.values.to(values.dtype)
        v_loss = (values - returns) ** 2
        if self.value_clip:
            v_clipped = old + torch.clamp(values - old, -self.value_clip, self.value_clip)
            v_loss_clipped = (v_clipped - returns) ** 2
            stats["value_clip_frac"] = masked_mean((v_loss_clipped > v_loss).float(), mask).item()
            v_loss = torch.maximum(v_loss, v_loss_clipped)
        value_loss = aggregate(0.5 * v_loss, mask, self.aggregation, self.normalizer, rollouts.totals)
        stats["policy_loss"] = policy_loss.item()
        stats["value_loss"] = value_loss.item()
        return policy_loss + self.vf_coef * value_loss, stats


@hookimpl
def rlctl_register_advantages(register):
    register("gae", GAEAdvantage)


@hookimpl
def rlctl_register_losses(register):
    register("ppo", PPOLoss)
