"""PPO family and ReFT: GAE, truncated-response EGAE, KL in the reward, the value loss, DAPO's overlong
penalty and ReFT's reward (ALGORITHMS.md section 2)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rlctl import plugins
from rlctl.rollouts import Rollouts
from rlctl_plugins.ppo import gae, truncated_rows

EOS = 9


def make_rollouts(rewards, values, lengths=None, ends_with_eos=None, info=None, **fields) -> Rollouts:
    values = torch.as_tensor(values, dtype=torch.float32)
    n, width = values.shape
    lengths = lengths or [width] * n
    mask = torch.zeros(n, width, dtype=torch.long)
    ids = torch.full((n, width), 5, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
        if ends_with_eos is None or ends_with_eos[i]:
            ids[i, length - 1] = EOS
    return Rollouts(
        prompt_ids=torch.ones(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=ids * mask,
        completion_mask=mask,
        group_ids=torch.arange(n),
        completions=[""] * n,
        info=info or [{"answer": "1"} for _ in range(n)],
        rewards=torch.as_tensor(rewards, dtype=torch.float32),
        values=values,
        **fields,
    )


def gae_advantage(**options):
    return plugins.get("advantage", "gae")(**options)


def test_gae_hand_check():
    # V = (0.3, 0.6, 0 terminal), r = (0, 1), gamma 0.95, lambda 1:
    # delta_1 = 1 - 0.6 = 0.4; delta_0 = 0.95 * 0.6 - 0.3 = 0.27; A_0 = 0.27 + 0.95 * 0.4 = 0.65
    r = make_rollouts([1.0], [[0.3, 0.6]])
    est = gae_advantage(gamma=0.95, lam=1.0, whiten=False)
    assert set(est.requires) == {"rewards", "values"}
    adv = est.compute(r)
    assert_close(adv, torch.tensor([[0.65, 0.40]]))
    assert_close(r.returns, torch.tensor([[0.95, 1.0]]))


def test_gae_padding_lambda_and_whitening():
    r = make_rollouts([1.0, 0.0], [[0.3, 0.6, 0.2], [0.5, 0.0, 0.0]], lengths=[3, 1])
    adv = gae_advantage(gamma=1.0, lam=0.5, whiten=False).compute(r)
    # row 0: delta = (0.3, -0.4, 0.8); A_2 = 0.8, A_1 = -0.4 + 0.5 * 0.8 = 0, A_0 = 0.3 + 0.5 * 0 = 0.3
    assert_close(adv, torch.tensor([[0.3, 0.0, 0.8], [-0.5, 0.0, 0.0]]))
    assert_close(r.returns, torch.tensor([[0.6, 0.6, 1.0], [0.0, 0.0, 0.0]]))
    white = gae_advantage(gamma=1.0, lam=0.5).compute(r)
    tokens = white[r.completion_mask.bool()]
    assert_close(tokens.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(tokens.std(unbiased=False), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert white[1, 1:].abs().sum() == 0
    assert_close(r.returns, torch.tensor([[0.6, 0.6, 1.0], [0.0, 0.0, 0.0]]))  # returns are not whitened


def test_gae_function_matches_a_reference_loop():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.ones(3, 6)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for i in range(3):
        length = int(mask[i].sum())
        running = 0.0
        for t in reversed(range(length)):
            next_v = values[i, t + 1] if t + 1 < length else 0.0
            running = rewards[i, t] + 0.9 * next_v - values[i, t] + 0.9 * 0.8 * running
            assert_close(adv[i, t], torch.as_tensor(running, dtype=torch.float32))
        assert (adv[i, length:] == 0).all() and (ret[i, length:] == 0).all()
    assert_close(ret, (adv + values) * mask)


def test_egae_complete_response_is_plain_gae():
    r = make_rollouts([1.0, 0.0], [[0.3, 0.6], [0.2, 0.0]], lengths=[2, 1])
    plain = gae_advantage(gamma=0.95, lam=1.0, whiten=False).compute(r)
    plain_returns = r.returns
    egae = gae_advantage(gamma=0.95, lam=1.0, whiten=False, bootstrap_truncated=True).compute(r)
    assert_close(egae, plain)
    assert_close(r.returns, plain_returns)


def test_egae_truncated_response_bootstraps_from_the_value_at_the_cut():
    r = make_rollouts([0.0], [[0.3, 0.6]], info=[{"answer": "1", "truncated": True}])
    adv = gae_advantage(gamma=0.95, lam=1.0, whiten=False, bootstrap_truncated=True).compute(r)
    # next value at the cut is V = 0.6, not 0: delta_1 = 0.95 * 0.6 - 0.6 = -0.03,
    # delta_0 = 0.95 * 0.6 - 0.3 = 0.27, A_0 = 0.27 + 0.95 * (-0.03) = 0.2415
    assert_close(adv, torch.tensor([[0.2415, -0.03]]))
    assert_close(r.returns, torch.tensor([[0.5415, 0.57]]))
    plain = gae_advantage(gamma=0.95, lam=1.0, whiten=False).compute(r)  # without EGAE: terminal at the cut
    assert_close(plain, torch.tensor([[0.27 + 0.95 * -0.6, -0.6]]))


def test_truncation_flags_from_info_or_mask():
    r = make_rollouts([0.0] * 4, torch.zeros(4, 3), lengths=[2, 3, 3, 1],
                      ends_with_eos=[True, False, True, True])
    # row 1 fills the width without EOS: truncated; row 2 fills it but ends like the finished rows
    assert truncated_rows(r).tolist() == [False, True, False, False]
    r.info[2]["truncated"] = True  # the sampler's record wins
    r.info[1]["truncated"] = False
    assert truncated_rows(r).tolist() == [False, False, True, False]
    full = make_rollouts([0.0] * 2, torch.zeros(2, 3))  # no shorter row to learn EOS from
    assert truncated_rows(full).tolist() == [True, True]


def test_kl_penalty_in_the_reward():
    old = torch.tensor([[-1.0, -1.0]])
    r = make_rollouts([1.0], [[0.0, 0.0]], old_logprobs=old, ref_logprobs=old - 0.5)
    est = gae_advantage(gamma=1.0, lam=1.0, whiten=False, kl_coef=0.1)  # k1 = log pi_old / pi_ref = 0.5
    assert set(est.requires) == {"rewards", "values", "ref_logprobs", "old_logprobs"}
    # token rewards (-0.05, 1 - 0.05), V = 0: A_t = sum of the rewards from t on
    assert_close(est.compute(r), torch.tensor([[0.90, 0.95]]))
    assert_close(est.token_rewards(r), torch.tensor([[-0.05, 0.95]]))


def test_process_rewards_are_used_per_token():
    r = make_rollouts([[0.5, 0.0, 1.0]], [[0.0, 0.0, 0.0]], lengths=[2])
    adv = gae_advantage(gamma=1.0, lam=1.0, whiten=False).compute(r)
    assert_close(adv, torch.tensor([[0.5, 0.0, 0.0]]))  # the padded token's reward is ignored


def test_gae_validates_options():
    with pytest.raises(ValueError, match="lam"):
        gae_advantage(lam=1.5)
    with pytest.raises(ValueError, match="kl_estimator"):
        gae_advantage(kl_estimator="k4")


def ppo_batch(new_value: float, old_value: float = 0.5, ret: float = 1.0):
    r = make_rollouts([1.0], [[old_value]])
    r.returns = torch.tensor([[ret]])
    r.advantages = torch.zeros(1, 1)
    r.old_logprobs = torch.full((1, 1), -1.0)
    values = torch.tensor([[new_value]], requires_grad=True)
    return r, values


def test_ppo_value_loss_is_clipped():
    loss_cls = plugins.get("loss", "ppo")
    fn = loss_cls(vf_coef=1.0, value_clip=0.2)
    assert {"values", "advantages", "old_logprobs"} <= set(fn.requires)
    r, values = ppo_batch(0.9)
    loss, stats = fn.compute(r, r.old_logprobs.clone(), values=values)
    # unclipped (0.9 - 1)^2 = 0.01; clipped V = 0.5 + 0.2 = 0.7 -> 0.09; 0.5 * max = 0.045
    assert_close(loss, torch.tensor(0.045))
    assert stats["value_clip_frac"] == 1.0
    loss.backward()
    assert_close(values.grad, torch.zeros(1, 1))  # the clipped branch is constant in V
    r, values = ppo_batch(0.9)
    loss, _ = loss_cls(vf_coef=1.0, value_clip=0.0).compute(r, r.old_logprobs.clone(), values=values)
    assert_close(loss, torch.tensor(0.005))
    loss.backward()
    assert_close(values.grad, torch.tensor([[-0.1]]))


def test_ppo_loss_adds_the_policy_surrogate():
    r, values = ppo_batch(1.0, old_value=1.0)
    r.advantages = torch.ones(1, 1)
    lp = (r.old_logprobs + torch.log(torch.tensor(1.5))).requires_grad_(True)
    loss, stats = plugins.get("loss", "ppo")(vf_coef=0.5).compute(r, lp, values=values)
    assert_close(loss, torch.tensor(-1.2))  # the value is exact: only the clipped surrogate remains
    assert_close(stats["policy_loss"], -1.2)
    with pytest.raises(ValueError, match="gae"):
        plugins.get("loss", "ppo")().compute(r, lp)


def test_gae_then_ppo_end_to_end_gradient():
    r = make_rollouts([1.0, 0.0], [[0.3, 0.6], [0.1, 0.2]])
    r.old_logprobs = torch.full((2, 2), -1.0)
    r.advantages = gae_advantage(gamma=1.0, lam=1.0, whiten=False).compute(r)
    values = r.values.clone().requires_grad_(True)
    lp = r.old_logprobs.clone().requires_grad_(True)
    loss, _ = plugins.get("loss", "ppo")(vf_coef=1.0).compute(r, lp, values=values)
    loss.backward()
    assert_close(lp.grad, -r.advantages / 4)  # on policy: REINFORCE with token-mean
    assert_close(values.grad, (r.values - r.returns) / 4)  # at V = V_old the clip is inactive


def test_overlong_soft_penalty_is_a_linear_ramp():
    reward = plugins.get("reward", "overlong")(max_len=10, cache_len=4)
    r = make_rollouts([0.0] * 6, torch.zeros(6, 12), lengths=[5, 6, 7, 8, 10, 12])
    assert_close(reward.score(r), torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    hard = plugins.get("reward", "overlong")(max_len=10, cache_len=0)
    assert_close(hard.score(r), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -1.0]))
    with pytest.raises(ValueError, match="cache_len"):
        plugins.get("reward", "overlong")(max_len=10, cache_len=11)


def test_reft_reward():
    reward = plugins.get("reward", "reft")()
    texts = ["so the answer 7", "the answer is 8", "no idea", "#### 8.0", "answer 8"]
    info = [{"answer": "8"}] * 4 + [{"answer": None}]
    r = make_rollouts([0.0] * 5, torch.zeros(5, 1), info=info)
    r.completions = texts
    assert_close(reward.score(r), torch.tensor([0.1, 1.0, 0.0, 1.0, 0.0]))
    r.completions = ["answer 7"] * 5
    assert_close(plugins.get("reward", "reft")(partial=0.0).score(r), torch.zeros(5))
    with pytest.raises(ValueError, match="partial"):
        plugins.get("reward", "reft")(partial=2.0)
