"""Policy losses of the peers' menus: CISPO, SAPO, GMPO, Clip-Cov, KL-Cov, GPG, and the straight-through KL
estimators k1+ / k3+. Every expected number is worked out by hand from the paper's formula (docstrings)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlctl import plugins
from rlctl.ops import kl_penalty
from tests.test_policy_losses import logprobs_at_ratio, make_rollouts, on_policy_kl_gradients

LN2 = math.log(2.0)


def loss_fn(name: str, **options):
    return plugins.get("loss", name)(**options)


def rollouts_with_logprob(adv, ratio, logprob):
    """One token per row with pi/pi_old = ratio and log pi = logprob: old = logprob - log ratio."""
    adv = torch.as_tensor(adv, dtype=torch.float32).reshape(-1, 1)
    ratio = torch.as_tensor(ratio, dtype=torch.float32).reshape(-1, 1).expand_as(adv)
    lp = torch.as_tensor(logprob, dtype=torch.float32).reshape(-1, 1).expand_as(adv).clone()
    r = make_rollouts(adv, old_logprobs=lp - ratio.log())
    return r, lp.requires_grad_(True)


# ------------------------------------------------------------------------------------------ CISPO
def test_cispo_hand_check_and_stop_gradient_weight():
    """loss = -sg(clip(rho, 1 - eps_low, 1 + eps_high)) A log pi.

    rho = 2, A = 1, log pi = -1, clip_high = 0.5: w = clip(2, 0, 1.5) = 1.5, loss = -1.5 * 1 * (-1) = 1.5,
    d loss / d log pi = -w A = -1.5 (the weight carries no gradient). PPO's clip would give 0 here.
    Default clip_high = 5: w = 2, loss 2, gradient -2. A = -1, rho = 0.5, clip_low = 0.2: w = 0.8,
    loss = -0.8 * (-1) * (-1) = -0.8, gradient +0.8; default clip_low = 1 (no lower bound): w = 0.5.
    """
    r, lp = rollouts_with_logprob([1.0], 2.0, -1.0)
    loss, stats = loss_fn("cispo", clip_high=0.5).compute(r, lp)
    assert_close(loss, torch.tensor(1.5))
    assert stats["clip_frac"] == 1.0
    loss.backward()
    assert_close(lp.grad, torch.tensor([[-1.5]]))
    ppo_lp = logprobs_at_ratio(r, 2.0)
    loss_fn("ppo_clip", clip_low=0.5).compute(r, ppo_lp)[0].backward()
    assert_close(ppo_lp.grad, torch.zeros(1, 1))  # clipped: PPO drops the token, CISPO keeps it

    r, lp = rollouts_with_logprob([1.0], 2.0, -1.0)
    loss, _ = loss_fn("cispo").compute(r, lp)
    assert_close(loss, torch.tensor(2.0))
    loss.backward()
    assert_close(lp.grad, torch.tensor([[-2.0]]))

    r, lp = rollouts_with_logprob([-1.0], 0.5, -1.0)
    loss, _ = loss_fn("cispo", clip_low=0.2).compute(r, lp)
    assert_close(loss, torch.tensor(-0.8))
    loss.backward()
    assert_close(lp.grad, torch.tensor([[0.8]]))
    r, lp = rollouts_with_logprob([-1.0], 0.5, -1.0)
    loss_fn("cispo").compute(r, lp)[0].backward()
    assert_close(lp.grad, torch.tensor([[0.5]]))


# ------------------------------------------------------------------------------------------- SAPO
def test_sapo_soft_gate_hand_check():
    """loss = -(4/tau) sigmoid(tau (rho - 1)) A; d loss / d log pi = -4 s (1 - s) rho A, s = sigmoid(.).

    rho = 1, A = 1, tau_pos = 1: s = 0.5, loss = -4 * 0.5 = -2, gradient -4 * 0.25 * 1 = -1 (REINFORCE).
    rho = 1, A = -1, tau_neg = 1.05: loss = (4 / 1.05) * 0.5 = 1.904762, gradient +1.
    rho = 2, A = 1, tau = 1: s = sigmoid(1) = 0.731059, loss = -2.924234,
    gradient = -4 * 0.731059 * 0.268941 * 2 = -1.572895 (attenuated smoothly, not cut to 0).
    """
    r, lp = rollouts_with_logprob([1.0], 1.0, -1.0)
    loss, stats = loss_fn("sapo").compute(r, lp)
    assert_close(loss, torch.tensor(-2.0))
    assert stats["soft_gate_weight"] == pytest.approx(1.0)
    loss.backward()
    assert_close(lp.grad, torch.tensor([[-1.0]]))

    r, lp = rollouts_with_logprob([-1.0], 1.0, -1.0)
    loss, _ = loss_fn("sapo").compute(r, lp)
    assert_close(loss, torch.tensor(1.904762))
    loss.backward()
    assert_close(lp.grad, torch.tensor([[1.0]]))

    r, lp = rollouts_with_logprob([1.0], 2.0, -1.0)
    loss, _ = loss_fn("sapo").compute(r, lp)
    assert_close(loss, torch.tensor(-2.924234))
    loss.backward()
    assert_close(lp.grad, torch.tensor([[-1.572895]]))
    with pytest.raises(ValueError, match="tau_neg = 0"):
        loss_fn("sapo", tau_neg=0.0)


# ------------------------------------------------------------------------------------------- GMPO
def test_gmpo_geometric_mean_clipped_in_log_space():
    """Tokens with ratios 2 and 0.5 (log +-0.693), clip 0.4 in log space, one sequence.

    A = 1: l = (min(0.693, 0.4), min(-0.693, -0.4)) = (0.4, -0.693); mean -0.146574; s = e^-0.146574
    = 0.863664; loss = -0.863664. Gradient: token 1 is clipped (0), token 2 -A s / 2 = -0.431832.
    A = -1: l = (max(0.693, 0.4), max(-0.693, -0.4)) = (0.693, -0.4); mean 0.146574; s = 1.157855;
    loss = +1.157855; gradient (s / 2, 0) = (0.578928, 0).
    """
    r = make_rollouts([[1.0, 1.0]])
    lp = logprobs_at_ratio(r, torch.tensor([[2.0, 0.5]]))
    loss, stats = loss_fn("gmpo").compute(r, lp)
    assert_close(loss, torch.tensor(-0.863664))
    assert stats["clip_frac"] == 0.5
    loss.backward()
    assert_close(lp.grad, torch.tensor([[0.0, -0.431832]]))

    r = make_rollouts([[-1.0, -1.0]])
    lp = logprobs_at_ratio(r, torch.tensor([[2.0, 0.5]]))
    loss, _ = loss_fn("gmpo").compute(r, lp)
    assert_close(loss, torch.tensor(1.157855))
    loss.backward()
    assert_close(lp.grad, torch.tensor([[0.578928, 0.0]]))


def test_gmpo_equal_ratios_and_padding():
    """Equal ratios r on every real token: geometric mean r (padding ignored): r = 1.1, A = 1 -> -1.1."""
    r = make_rollouts([[1.0, 1.0, 1.0]], lengths=[2])
    loss, _ = loss_fn("gmpo").compute(r, logprobs_at_ratio(r, torch.tensor([[1.1, 1.1, 40.0]])))
    assert_close(loss, torch.tensor(-1.1))


# ------------------------------------------------------------------------------------ Clip-Cov/KL-Cov
COV_ADV = [[3.0], [-1.0], [-1.0], [-1.0]]
COV_LOGP = [-0.5, -1.5, -1.5, -1.5]
# centred A = (3, -1, -1, -1) (mean 0); centred log pi = (0.75, -0.25, -0.25, -0.25) (mean -1.25);
# cov = (2.25, 0.25, 0.25, 0.25): only token 0 lies in (1, 5), and it has the top covariance.


def test_clip_cov_drops_the_high_covariance_token():
    """clip_ratio 2e-4 of 4 tokens -> at least 1 token dropped: token 0 (cov 2.25 in (1, 5)).

    On policy (rho = 1) the per-token losses are -A = (-3, 1, 1, 1); token 0 dropped -> (0 + 3) / 4 = 0.75
    (plain PPO: 0 / 4 = 0). Gradient: 0 on token 0, -A / 4 = 0.25 on the others.
    If the PPO clip already clipped token 0 (rho = 1.5 > 1.2, A > 0) it is not a candidate: nothing is
    dropped and the loss is (-1.2 * 3 + 3) / 4 = -0.15.
    """
    r, lp = rollouts_with_logprob(COV_ADV, 1.0, COV_LOGP)
    loss, stats = loss_fn("clip_cov").compute(r, lp)
    assert_close(loss, torch.tensor(0.75))
    assert stats["cov_clip_frac"] == 0.25
    assert stats["cov_mean"] == pytest.approx((2.25 + 0.75) / 4)
    loss.backward()
    assert_close(lp.grad, torch.tensor([[0.0], [0.25], [0.25], [0.25]]))

    r, lp = rollouts_with_logprob(COV_ADV, [1.5, 1.0, 1.0, 1.0], COV_LOGP)
    loss, stats = loss_fn("clip_cov").compute(r, lp)
    assert_close(loss, torch.tensor(-0.15))
    assert stats["cov_clip_frac"] == 0.0
    with pytest.raises(ValueError, match="clip_ratio = 0"):
        loss_fn("clip_cov", clip_ratio=0.0)
    with pytest.raises(ValueError, match="cov_low = 5.0, cov_high = 1.0"):
        loss_fn("clip_cov", cov_low=5.0, cov_high=1.0)


def test_kl_cov_penalises_the_top_covariance_token():
    """Unclipped -rho A everywhere, + coef |log rho| on the top-1 covariance token (token 0).

    rho_0 = 2 (log pi unchanged, so cov as above), A_0 = 3: -6 + ln 2 = -5.306853; others 1 each;
    loss = (-5.306853 + 3) / 4 = -0.576713. Gradient on token 0: (-rho A + sign(log rho)) / 4 =
    (-6 + 1) / 4 = -1.25 (PPO would clip rho = 2 to 1.2 and give 0); others -A / 4 = 0.25.
    """
    r, lp = rollouts_with_logprob(COV_ADV, [2.0, 1.0, 1.0, 1.0], COV_LOGP)
    loss, stats = loss_fn("kl_cov").compute(r, lp)
    assert_close(loss, torch.tensor(-0.576713))
    assert stats["cov_kl_frac"] == 0.25
    loss.backward()
    assert_close(lp.grad, torch.tensor([[-1.25], [0.25], [0.25], [0.25]]))
    with pytest.raises(ValueError, match="kl_cov_coef = -1"):
        loss_fn("kl_cov", kl_cov_coef=-1.0)


# -------------------------------------------------------------------------------------------- GPG
def test_gpg_loss_is_minus_advantage_log_pi_without_old_logprobs():
    """A = 2, log pi = -1: loss = -2 * (-1) = 2, gradient -2; no ratio, so no old log-probs needed."""
    r, lp = rollouts_with_logprob([2.0], 1.0, -1.0)
    r.old_logprobs = None
    fn = loss_fn("gpg")
    assert "old_logprobs" not in fn.requires and "advantages" in fn.requires
    loss, _ = fn.compute(r, lp)
    assert_close(loss, torch.tensor(2.0))
    loss.backward()
    assert_close(lp.grad, torch.tensor([[-2.0]]))


# -------------------------------------------------------------------------------- straight-through KL
def test_straight_through_kl_value_of_one_gradient_of_k2():
    """log pi = 0, log pi_ref = ln 2: k1 = -ln 2 = -0.693, k3 = 1 - ln 2 = 0.307, k2 = (ln 2)^2 / 2.
    The gradient of k2 in log pi is log pi - log pi_ref = -0.693 (k3's own gradient is 1 - pi_ref/pi = -1).
    """
    ref = torch.tensor([LN2])
    for name, value in (("k1+", -LN2), ("k3+", 1 - LN2)):
        lp = torch.zeros(1, requires_grad=True)
        kl = kl_penalty(lp, ref, name)
        assert_close(kl.detach(), torch.tensor([value]))
        kl.sum().backward()
        assert_close(lp.grad, torch.tensor([-LN2]), msg=name)
    lp = torch.zeros(1, requires_grad=True)
    kl_penalty(lp, ref, "k3").sum().backward()
    assert_close(lp.grad, torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="accepted: k1, k2, k3, k1\\+, k3\\+"):
        kl_penalty(lp, ref, "k4")


def test_straight_through_kl_follows_the_reverse_kl_on_policy():
    """Expected over pi, k1+ and k3+ have k2's gradient: that of KL(pi || pi_ref)."""
    grads = on_policy_kl_gradients("k1+", "k3+")
    for name in ("k1+", "k3+"):
        assert_close(grads[name], grads["reverse"], msg=name)


def test_straight_through_kl_in_the_loss():
    """ppo_clip with kl_coef 0.5, k3+: the logged kl is k3 = 0.307, the loss 0.5 * 0.307 = 0.153 (A = 0)."""
    r = make_rollouts([0.0])
    r.ref_logprobs = r.old_logprobs + LN2
    loss, stats = loss_fn("ppo_clip", kl_coef=0.5, kl_estimator="k3+").compute(r, logprobs_at_ratio(r, 1.0))
    assert_close(loss, torch.tensor(0.5 * (1 - LN2)))
    assert stats["kl"] == pytest.approx(1 - LN2)
    with pytest.raises(ValueError, match="kl_estimator = 'k5'"):
        loss_fn("ppo_clip", kl_estimator="k5")


@pytest.mark.parametrize("name", ["cispo", "sapo", "gmpo", "clip_cov", "kl_cov", "gpg"])
def test_variants_registered_with_paper_and_shared_options(name):
    fn = loss_fn(name, kl_coef=0.1, entropy_coef=0.01)
    assert {"advantages", "ref_logprobs", "entropy"} <= set(fn.requires)
    assert plugins.get("loss", name).paper
    with pytest.raises(ValueError, match="aggregation"):
        loss_fn(name, aggregation="mean")
