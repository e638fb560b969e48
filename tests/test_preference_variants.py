"""TRL's DPO-trainer loss menu on rlctl's pairs batches: hand-computed values (preference_variants.py),
WPO weighting and length-normalised IPO (preference.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlctl import plugins
from tests.test_preference import LENGTHS, POLICY, hand_batch, pairs_rollouts, token_logprobs

# The hand batch of test_preference: pi_w = -1, pi_l = -3, ref_w = ref_l = -2 (summed), so
# rho_w = 1, rho_l = -1, h = 2; lengths 2 and 3 (mean log-probs -0.5 and -1).
LOG2 = math.log(2.0)


def loss(name, **options):
    return plugins.get("loss", name)(**options)


def at_reference():
    return pairs_rollouts(LENGTHS, ref=POLICY.clone())


def value(name, batch=None, logprobs=POLICY, **options):
    return loss(name, **options).compute(batch if batch is not None else hand_batch(), logprobs)[0]


def test_hinge():
    """max(0, 1 - beta h): beta 0.5, h 2 -> 0; beta 0.25 -> 0.5; at the reference (h 0) -> 1.
    reference_free: h = log pi(w) - log pi(l) = 2 even when pi = ref -> beta 0.25 gives 0.5, no reference."""
    assert_close(value("hinge", beta=0.5), torch.tensor(0.0))
    assert_close(value("hinge", beta=0.25), torch.tensor(0.5))
    assert_close(value("hinge", at_reference(), beta=0.25), torch.tensor(1.0))
    free = loss("hinge", beta=0.25, reference_free=True)
    assert free.requires == ()
    assert_close(free.compute(pairs_rollouts(LENGTHS), POLICY)[0], torch.tensor(0.5))


def test_nca_pair():
    """beta 0.5: r_w = 0.5, r_l = -0.5: softplus(-0.5) + 0.5 softplus(0.5) + 0.5 softplus(-0.5)
    = 0.474077 + 0.487039 + 0.237039 = 1.198154; at the reference 2 ln 2 = 1.386294."""
    assert_close(value("nca_pair", beta=0.5), torch.tensor(1.198154))
    assert_close(value("nca_pair", at_reference()), torch.tensor(2 * LOG2))


def test_bco_pair_running_reward_mean():
    """Reference with rejected tokens at -1 (ref_l = -3): rho_w = 1, rho_l = 0; beta 1: rewards 1, 0,
    delta = 0.5 -> -log s(0.5) - log s(0.5) = 2 * 0.474077 = 0.948154.
    Then a batch at the reference (rewards 0, 0): delta = (1 + 0 + 0 + 0) / 4 = 0.25 ->
    softplus(0.25) + softplus(-0.25) = 0.825939 + 0.575939 = 1.401878. Delta survives a checkpoint."""
    ref = token_logprobs([[-1.0, -1.0], [-1.0, -1.0, -1.0]], 3)
    bco = loss("bco_pair", beta=1.0)
    first, stats = bco.compute(pairs_rollouts(LENGTHS, ref=ref), POLICY)
    assert_close(first, torch.tensor(0.948154))
    assert stats["bco_delta"] == pytest.approx(0.5)
    second, _ = bco.compute(at_reference(), POLICY)
    assert_close(second, torch.tensor(1.401878))
    assert bco.state_dict() == {"delta": pytest.approx(0.25), "count": 4.0}
    resumed = loss("bco_pair", beta=1.0)
    resumed.load_state_dict(bco.state_dict())
    assert resumed.delta == pytest.approx(0.25)


def test_apo_zero_and_down():
    """beta 0.5: apo_zero (1 - s(0.5)) + s(-0.5) = 2 * 0.377541 = 0.755081;
    apo_down s(0.5) + (1 - s(1)) = 0.622459 + 0.268941 = 0.891401; both 1 at the reference."""
    assert_close(value("apo_zero", beta=0.5), torch.tensor(0.755081))
    assert_close(value("apo_down", beta=0.5), torch.tensor(0.891401))
    for name in ("apo_zero", "apo_down"):
        assert_close(value(name, at_reference()), torch.tensor(1.0))


def test_discopop():
    """x = beta h = 1, tau 1: m = s(1) = 0.731059 -> 0.268941 * softplus(-1) + 0.731059 * e^-1
    = 0.084249 + 0.268941 = 0.353190. At the reference: m = 0.5 -> (ln 2 + 1) / 2 = 0.846574."""
    assert_close(value("discopop", beta=0.5, tau=1.0), torch.tensor(0.353190))
    assert_close(value("discopop", at_reference()), torch.tensor(0.846574))
    with pytest.raises(ValueError, match="tau = 0"):
        loss("discopop", tau=0)


def test_sppo_hard():
    """(rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2: beta 0.5 -> (1 - 1)^2 + (-1 + 1)^2 = 0;
    beta 1 -> 0.5^2 + 0.5^2 = 0.5; at the reference, beta 0.5 -> 2 * 1^2 = 2."""
    assert_close(value("sppo_hard", beta=0.5), torch.tensor(0.0))
    assert_close(value("sppo_hard", beta=1.0), torch.tensor(0.5))
    assert_close(value("sppo_hard", at_reference(), beta=0.5), torch.tensor(2.0))


def test_aot_sorts_margins_across_the_batch():
    """Pair A: pi (w, l) = (-1, -3), ref (-2, -2): policy margin 2, ref margin 0, rho = (1, -1).
    Pair B: pi (-2, -1), ref (-1, -2): policy margin -1, ref margin 1, rho = (-1, 1).
    paired: sort([2, -1]) - sort([0, 1]) = [-1, 1] -> (softplus(1) + softplus(-1)) / 2 = 0.813262 (beta 1),
    where DPO's per-pair h = (2, -2) gives (softplus(-2) + softplus(2)) / 2 = 1.126928.
    unpaired: sort(rho_w) - sort(rho_l) = [-1, 1] - [-1, 1] = [0, 0] -> ln 2. One pair: AOT = DPO."""
    logprobs = token_logprobs([[-1.0], [-3.0], [-2.0], [-1.0]], 1)
    ref = token_logprobs([[-2.0], [-2.0], [-1.0], [-2.0]], 1)
    batch = pairs_rollouts([1, 1, 1, 1], ref=ref)
    assert_close(value("aot", batch, logprobs, beta=1.0), torch.tensor(0.813262))
    assert_close(value("dpo", batch, logprobs, beta=1.0), torch.tensor(1.126928))
    assert_close(value("aot", batch, logprobs, beta=1.0, paired=False), torch.tensor(LOG2))
    assert_close(value("aot", beta=0.5), value("dpo", beta=0.5))


def test_wpo_weights_the_pair_without_gradient():
    """w = exp(mean log pi(w) + mean log pi(l)) = exp(-0.5 - 1) = 0.223130; DPO (beta 0.5) 0.313262
    -> 0.069898, and the gradient is w times DPO's."""
    lp = POLICY.clone().requires_grad_(True)
    weighted, stats = loss("dpo", beta=0.5, wpo=True).compute(hand_batch(), lp)
    assert_close(weighted, torch.tensor(0.069898))
    assert stats["wpo_weight"] == pytest.approx(math.exp(-1.5))
    weighted.backward()
    plain_lp = POLICY.clone().requires_grad_(True)
    loss("dpo", beta=0.5).compute(hand_batch(), plain_lp)[0].backward()
    assert_close(lp.grad, math.exp(-1.5) * plain_lp.grad)
    assert_close(value("nca_pair", beta=0.5, wpo=True), torch.tensor(1.198154 * math.exp(-1.5)))


def test_ipo_length_normalised():
    """rho per token: 1/2 and -1/3 -> h = 0.833333; beta 1: (0.833333 - 0.5)^2 = 1/9 (summed: 2.25)."""
    assert_close(value("ipo", beta=1.0, length_normalize=True), torch.tensor(1 / 9))
    assert_close(value("ipo", beta=1.0), torch.tensor(2.25))


@pytest.mark.parametrize("name", ["hinge", "nca_pair", "bco_pair", "apo_zero", "apo_down", "discopop",
                                  "sppo_hard", "aot"])
def test_registered_need_reference_and_validate_beta(name):
    assert loss(name).requires == ("ref_logprobs",)
    assert plugins.get("loss", name).paper
    with pytest.raises(ValueError, match="beta = 0.0"):
        loss(name, beta=0.0)
