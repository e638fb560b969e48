"""Adaptive KL coefficient, in the loss (ppo_clip family) and in the reward (gae)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlctl import plugins
from rlctl.rollouts import Rollouts
from rlctl.state import TrainState
from rlctl_plugins.kl_control import AdaptiveKLController
from tests.test_policy_losses import logprobs_at_ratio, make_rollouts


def test_controller_hand_check():
    """coef 0.1, target 6, horizon 10000, 256 completions per step:
    KL 12 -> e = clip(1, -0.2, 0.2) = 0.2 -> coef * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512 = 0.100512;
    KL 3 -> e = -0.2 -> 0.1 * 0.99488 = 0.099488; KL 6.6 -> e = 0.1 -> 0.1 * 1.00256 = 0.100256."""
    for kl, expected in ((12.0, 0.100512), (3.0, 0.099488), (6.6, 0.100256)):
        ctrl = AdaptiveKLController(0.1, 6.0, 10000)
        assert ctrl.update(kl, 256) == pytest.approx(expected)


def test_loss_placement_adapts_after_each_step_through_the_hook():
    fn = plugins.get("loss", "ppo_clip")(kl_coef=0.1, kl_target=6.0, kl_horizon=10000)
    r = make_rollouts([0.0])
    r.ref_logprobs = r.old_logprobs + math.log(2.0)
    _, stats = fn.compute(r, logprobs_at_ratio(r, 1.0))
    assert stats["kl_coef"] == pytest.approx(0.1)
    state = TrainState(components={"loss": fn})
    plugins.hook().rlctl_on_step_end(state=state, metrics={"kl": 12.0, "samples": 256})  # registered hook
    assert fn.kl_coef == pytest.approx(0.100512)
    plugins.hook().rlctl_on_step_end(state=state, metrics={"samples": 256})  # no KL logged: unchanged
    assert fn.kl_coef == pytest.approx(0.100512)
    saved = fn.state_dict()
    fresh = plugins.get("loss", "ppo_clip")(kl_coef=0.1, kl_target=6.0)
    fresh.load_state_dict(saved)
    assert fresh.kl_coef == pytest.approx(0.100512)  # resumes exactly
    fixed = plugins.get("loss", "ppo_clip")(kl_coef=0.1)
    plugins.hook().rlctl_on_step_end(state=TrainState(components={"loss": fixed}), metrics={"kl": 12.0, "samples": 256})
    assert fixed.kl_coef == 0.1 and fixed.state_dict() == {}


def test_reward_placement_uses_then_updates_the_coefficient():
    """Two rows of 2 tokens, V = 0, k1 = log pi_old - log pi_ref = 0.5 per token; rewards [1, 0] on the last
    token; gamma = lam = 1, no whitening. Coef 0.1: row 0's token rewards (-0.05, 0.95) -> A_0 = 0.9.
    Then KL 0.5 vs target 0.25 -> e = 0.2, n = 2, horizon 10 -> coef 0.1 * 1.04 = 0.104, and the next
    batch gets A_0 = 1 - 2 * 0.052 = 0.896."""
    mask = torch.ones(2, 2, dtype=torch.long)
    batch = Rollouts(prompt_ids=torch.ones(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
                     completion_ids=torch.ones(2, 2, dtype=torch.long), completion_mask=mask,
                     group_ids=torch.arange(2), rewards=torch.tensor([1.0, 0.0]), values=torch.zeros(2, 2),
                     old_logprobs=torch.zeros(2, 2), ref_logprobs=torch.full((2, 2), -0.5),
                     info=[{"truncated": False}] * 2)
    gae = plugins.get("advantage", "gae")(gamma=1.0, lam=1.0, whiten=False, kl_coef=0.1, kl_target=0.25,
                                          kl_horizon=10)
    adv = gae.compute(batch)
    assert_close(adv[0, 0], torch.tensor(0.9))
    assert gae.last_stats["reward_kl_coef"] == pytest.approx(0.1)
    assert gae.kl_coef == pytest.approx(0.104)
    assert_close(gae.compute(batch)[0, 0], torch.tensor(0.896))
    assert gae.state_dict() == {"kl_coef": pytest.approx(0.104 * 1.04)}


@pytest.mark.parametrize("kind, name", [("loss", "ppo_clip"), ("loss", "cispo"), ("advantage", "gae")])
@pytest.mark.parametrize("options, message", [
    ({"kl_coef": 0.1, "kl_target": -1.0}, "kl_target = -1.0: accepted values are 0"),
    ({"kl_coef": 0.0, "kl_target": 6.0}, "kl_target = 6.0 needs kl_coef > 0"),
    ({"kl_coef": 0.1, "kl_target": 6.0, "kl_horizon": 0}, "kl_horizon = 0: accepted values are > 0"),
])
def test_bad_controller_options(kind, name, options, message):
    with pytest.raises(ValueError, match=message):
        plugins.get(kind, name)(**options)
