"""Advantages with other baselines: OPO, GPG, ReMax (sampler + advantage), hand-computed."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rlctl import plugins
from rlctl.generation import generate
from rlctl.rollouts import Prompt
from tests.test_advantages import advantage, make_rollouts, per_sample


def test_opo_length_weighted_baseline():
    """Group [1, 0] with lengths [1, 3]: b = (1*1 + 3*0) / 4 = 0.25 -> A = [0.75, -0.25] (GRPO's mean
    baseline 0.5 would give +-0.5). Group [0, 1], lengths [1, 3]: b = 3/4 -> A = [-0.75, 0.25].
    Group [1, 1]: b = 1 -> A = 0."""
    r = make_rollouts([1, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2], lengths=[1, 3, 1, 3, 2, 3])
    adv = advantage("opo").compute(r)
    assert_close(per_sample(adv), torch.tensor([0.75, -0.25, -0.75, 0.25, 0.0, 0.0]))
    assert_close(adv[1], torch.full((3,), -0.25))  # every completion token carries it
    assert adv[0, 1:].abs().sum() == 0  # padding stays 0


def test_gpg_advantage_and_its_gradient_correction():
    """Groups [1, 0] and [1, 1]: r - mean = [0.5, -0.5, 0, 0].
    Paper: B = 4 samples, M = 2 in the all-equal group, alpha = 4 / (4 - 2) = 2 -> [1, -1, 0, 0].
    verl's variant: alpha = 4 / (3 non-zero rewards) = 4/3 -> [2/3, -2/3, 0, 0]. No correction: [0.5, -0.5, 0, 0].
    With the group std (0.5 in group 0): [1, -1, 0, 0] * 2 = [2, -2, 0, 0]."""
    r = make_rollouts([1, 0, 1, 1], [0, 0, 1, 1])
    gpg = advantage("gpg")
    assert_close(per_sample(gpg.compute(r)), torch.tensor([1.0, -1.0, 0.0, 0.0]))
    assert gpg.last_stats["gpg_alpha"] == 2.0
    assert_close(per_sample(advantage("gpg", correction="nonzero_rewards").compute(r)),
                 torch.tensor([2 / 3, -2 / 3, 0.0, 0.0]))
    assert_close(per_sample(advantage("gpg", correction="none").compute(r)), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    assert_close(per_sample(advantage("gpg", std_scope="group").compute(r)), torch.tensor([2.0, -2.0, 0.0, 0.0]),
                 atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="correction = 'paper'"):
        advantage("gpg", correction="paper")


def remax_rollouts(rewards, groups, greedy):
    r = make_rollouts(rewards, groups, info=[{"remax_greedy": g} for g in greedy])
    return r


def test_remax_greedy_baseline():
    """Group 0: sampled [1, 0], greedy 1 -> A = [0, -1], greedy row 0.
    Group 1: sampled [1], greedy 0 -> A = [1], greedy row 0 (group_size = 1 is the paper's setting)."""
    r = remax_rollouts([1, 0, 1, 1, 0], [0, 0, 0, 1, 1], [False, False, True, False, True])
    est = advantage("remax")
    assert est.min_group_size == 1
    assert_close(per_sample(est.compute(r)), torch.tensor([0.0, -1.0, 0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="exactly one greedy completion per prompt \\(group 0 has 0\\); use sampler 'remax'"):
        est.compute(remax_rollouts([1, 0], [0, 0], [False, False]))


def test_remax_sampler_adds_a_masked_greedy_completion(tiny_policy):
    sampler = plugins.get("sampler", "remax")(max_new_tokens=4)
    assert "loss_mask" in sampler.provides
    prompts = [Prompt("1+1=", answer="2"), Prompt("2+2=", answer="4")]
    torch.manual_seed(0)
    batch = sampler.sample(tiny_policy, prompts, group_size=2)
    assert len(batch) == 6
    assert batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    flags = [info["remax_greedy"] for info in batch.info]
    assert flags == [False, False, True, False, False, True]
    greedy = generate(tiny_policy, prompts, 1, max_new_tokens=4, do_sample=False)
    assert [batch.completions[2], batch.completions[5]] == greedy.completions  # the argmax decoding
    assert (batch.loss_mask[[2, 5]] == 0).all()
    assert torch.equal(batch.loss_mask[[0, 1, 3, 4]], batch.completion_mask[[0, 1, 3, 4]])


@pytest.mark.slow
def test_remax_cispo_with_adaptive_kl_trains_from_a_recipe(tiny_model_dir, tmp_path):
    """Two steps from a recipe: the remax sampler + advantage, the cispo loss, an adaptive KL in the loss.
    The coefficient logged at step 1 is the one the hook updated after step 0."""
    import json

    from conftest import grpo_recipe, write_recipe
    from rlctl.recipe import load_recipe
    from rlctl.trainer import Trainer

    text = grpo_recipe(tiny_model_dir, steps=2).replace('use = "hf"', 'use = "remax"')
    text = text.replace('use = "grpo"', 'use = "remax"')
    text = text.replace('use = "ppo_clip"', 'use = "cispo"\nkl_coef = 0.1\nkl_target = 0.01\nkl_horizon = 16')
    recipe = load_recipe(write_recipe(tmp_path, text))
    Trainer(recipe, output_dir=tmp_path / "run", show_progress=False).run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "kl_coef" in row]
    assert len(steps) == 2 and steps[0]["kl_coef"] == pytest.approx(0.1)
    assert steps[0]["samples"] == 4 * (4 + 1)  # 4 sampled + 1 greedy completion per prompt
    error = min(max(steps[0]["kl"] / 0.01 - 1, -0.2), 0.2)
    assert steps[1]["kl_coef"] == pytest.approx(0.1 * (1 + error * steps[0]["samples"] / 16))
