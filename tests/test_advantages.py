"""Advantage estimators: hand-computed checks (docs/algorithms, ALGORITHMS.md section 1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlctl import plugins
from rlctl.rollouts import Rollouts


def make_rollouts(rewards, group_ids, lengths=None, width=None, info=None, **fields) -> Rollouts:
    n = len(rewards)
    lengths = lengths or [3] * n
    width = width or max(lengths)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    return Rollouts(
        prompt_ids=torch.ones(n, 2, dtype=torch.long),
        prompt_mask=torch.ones(n, 2, dtype=torch.long),
        completion_ids=torch.arange(1, width + 1).repeat(n, 1) * mask,
        completion_mask=mask,
        group_ids=torch.tensor(group_ids),
        info=info or [{"answer": "0"} for _ in range(n)],
        rewards=torch.tensor(rewards, dtype=torch.float32),
        **fields,
    )


def advantage(name: str, **options):
    return plugins.get("advantage", name)(**options)


def per_sample(adv: torch.Tensor) -> torch.Tensor:
    """The advantage of each sample (the first token's; every token carries the same value)."""
    return adv[:, 0]


def test_grpo_hand_check_and_token_broadcast():
    r = make_rollouts([1, 0, 0, 1], [0, 0, 0, 0], lengths=[3, 1, 2, 3])
    adv = advantage("grpo").compute(r)
    assert_close(per_sample(adv), torch.tensor([1.0, -1.0, -1.0, 1.0]))
    assert_close(adv, torch.tensor([[1.0, 1, 1], [-1, 0, 0], [-1, -1, 0], [1, 1, 1]]))


def test_grpo_std_conventions():
    r = make_rollouts([1, 0, 0, 1], [0, 0, 0, 0])
    # unbiased std of [1,0,0,1] = sqrt(1/3): A = 0.5 / 0.577 = 0.866
    assert_close(per_sample(advantage("grpo", unbiased_std=True).compute(r)),
                 torch.tensor([1.0, -1, -1, 1]) * math.sqrt(3) / 2)
    assert_close(per_sample(advantage("grpo", std_scope="none").compute(r)), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    with pytest.raises(ValueError, match="std_scope"):
        advantage("grpo", std_scope="token")


def test_dr_grpo_hand_check():
    r = make_rollouts([1, 0, 0, 0], [0, 0, 0, 0])
    assert_close(per_sample(advantage("dr_grpo").compute(r)), torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_lite_ppo_uses_group_mean_and_population_batch_std():
    # groups [1,0] and [1,1]: centred [0.5,-0.5,0,0]; population std of all rewards [1,0,1,1] is
    # sqrt(0.1875) = 0.433, so A = 0.5 / 0.433 = 1.155. (Unbiased std 0.5 would give 1.0; the std of the
    # centred values 0.354 would give 1.414: the documented number fixes the convention.)
    r = make_rollouts([1, 0, 1, 1], [0, 0, 1, 1])
    expected = torch.tensor([1.0, -1.0, 0.0, 0.0]) * 2 / math.sqrt(3)
    assert_close(per_sample(advantage("lite_ppo").compute(r)), expected)
    assert_close(per_sample(advantage("lite_ppo").compute(r)), torch.tensor([1.155, -1.155, 0, 0]), atol=1e-3, rtol=0)
    assert_close(per_sample(advantage("lite_ppo", unbiased_std=True).compute(r)), torch.tensor([1.0, -1.0, 0, 0]))


def test_rloo_leave_one_out_baseline():
    r = make_rollouts([1, 0, 0, 1, 5], [0, 0, 0, 0, 1])
    adv = per_sample(advantage("rloo").compute(r))
    assert_close(adv, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0]))  # a group of one has no baseline


def test_reinforce_pp_is_whitened_over_tokens():
    r = make_rollouts([1, 0, 0, 0, 2, 1, 0.5], [0, 0, 0, 0, 1, 1, 1], lengths=[4, 1, 2, 3, 4, 2, 1])
    adv = advantage("reinforce_pp").compute(r)
    m = r.completion_mask.bool()
    tokens = adv[m]
    assert_close(tokens.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(tokens.std(unbiased=False), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert (adv[~m] == 0).all()
    # hand check: groups [1,0] (lengths 1,1) and [1,0] (lengths 1,3): tokens of r - mean_group are
    # 0.5 x2 and -0.5 x4, token mean -1/6, population std sqrt(2)/3 -> A = sqrt(2) and -1/sqrt(2)
    small = make_rollouts([1, 0, 1, 0], [0, 0, 1, 1], lengths=[1, 1, 1, 3])
    s2 = math.sqrt(2)
    assert_close(per_sample(advantage("reinforce_pp").compute(small)), torch.tensor([s2, -1 / s2, s2, -1 / s2]))
    unbiased = advantage("reinforce_pp", unbiased_std=True).compute(r)[m]
    assert_close(unbiased.std(unbiased=True), torch.tensor(1.0), atol=1e-5, rtol=0)


def test_ngrpo_virtual_max_reward_sample():
    r = make_rollouts([0, 0, 0], [0, 0, 0])
    # [0,0,0] + virtual 1: mean 0.25, population std 0.433 -> -0.25 / 0.433 = -1/sqrt(3) = -0.577
    assert_close(per_sample(advantage("ngrpo").compute(r)), torch.full((3,), -1 / math.sqrt(3)))
    # the authors' code divides by n - 1: std 0.5 -> -0.5
    assert_close(per_sample(advantage("ngrpo", unbiased_std=True).compute(r)), torch.full((3,), -0.5))
    # an all-correct group stays at zero; a mixed group is shifted down
    r = make_rollouts([1, 1, 1, 0], [0, 0, 1, 1])
    adv = per_sample(advantage("ngrpo").compute(r))
    assert_close(adv[:2], torch.zeros(2))
    # group 1: [1, 0] + virtual 1: mean 2/3, std sqrt(2/9)
    assert_close(adv[2:], torch.tensor([1 / 3, -2 / 3]) / math.sqrt(2 / 9))
    r = make_rollouts([0, 0], [0, 0])
    assert_close(per_sample(advantage("ngrpo", max_reward=2.0).compute(r)), torch.full((2,), -1 / math.sqrt(2)))


def test_canon_halves_hand_check():
    # lengths 1..4, rewards [1,1,0,0]: the short half scores 1, the long half 0
    r = make_rollouts([1, 1, 0, 0], [0, 0, 0, 0], lengths=[1, 2, 3, 4])
    inter = per_sample(advantage("canon", metric="length", inter_weight=1.0).compute(r))
    assert_close(inter, torch.tensor([1.0, 1.0, -1.0, -1.0]))  # r - mean of the other half
    intra = per_sample(advantage("canon", inter_weight=0.0).compute(r))
    assert_close(intra, torch.zeros(4))  # r - mean of the own half
    half = per_sample(advantage("canon", inter_weight=0.5).compute(r))
    assert_close(half, per_sample(advantage("dr_grpo").compute(r)))  # mu = 1/2 is Dr. GRPO


@pytest.mark.parametrize("inter_weight", [1.0, 0.7, 0.0])
def test_canon_negating_the_metric_leaves_advantages_unchanged(inter_weight):
    torch.manual_seed(0)
    rewards = torch.rand(11).tolist()
    groups = [0] * 5 + [1] * 6  # an odd group (a middle member) and an even one
    metric = [3.0, 1.0, 2.0, 2.0, 5.0, 0.5, 0.1, 0.9, 0.9, 0.3, 0.7]  # with ties
    canon = advantage("canon", metric="score", inter_weight=inter_weight)
    a = canon.compute(make_rollouts(rewards, groups, info=[{"score": m} for m in metric]))
    b = canon.compute(make_rollouts(rewards, groups, info=[{"score": -m} for m in metric]))
    assert_close(a, b)
    assert not torch.allclose(a, advantage("dr_grpo").compute(make_rollouts(rewards, groups)))


def test_canon_entropy_metric_and_errors():
    lp = torch.tensor([[-0.1, -0.1], [-2.0, -2.0], [-0.2, -0.2], [-1.0, -1.0]])
    r = make_rollouts([0, 1, 0, 1], [0, 0, 0, 0], lengths=[2, 2, 2, 2], old_logprobs=lp)
    canon = advantage("canon", metric="entropy")
    assert set(canon.requires) == {"rewards", "old_logprobs"}
    # high-surprisal half {1, 3} scores 1, low half {0, 2} scores 0
    assert_close(per_sample(canon.compute(r)), torch.tensor([-1.0, 1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="old_logprobs"):
        canon.compute(make_rollouts([0, 1], [0, 0]))
    with pytest.raises(ValueError, match="inter_weight"):
        advantage("canon", inter_weight=1.5)
    with pytest.raises(ValueError, match="missing"):
        advantage("canon", metric="missing").compute(make_rollouts([0, 1], [0, 0]))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "lite_ppo", "rloo", "reinforce_pp", "ngrpo", "canon"])
def test_group_estimators_are_registered_and_reject_process_rewards(name):
    est = advantage(name)
    assert "rewards" in est.requires
    assert est.min_group_size == 2  # group_size = 1 is rejected before a run
    r = make_rollouts([1, 0], [0, 0])
    assert est.compute(r).shape == r.completion_mask.shape
    r.rewards = torch.ones(2, 3)
    with pytest.raises(ValueError, match="one reward per completion"):
        est.compute(r)
