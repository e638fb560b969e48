"""Policy losses: clipped surrogate, aggregation, dual-clip, TIS, GSPO, NGRPO clipping, KL and entropy."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlctl import plugins
from rlctl.ops import entropy_from_logits, kl_penalty
from rlctl.rollouts import Rollouts


def make_rollouts(advantages, lengths=None, old_logprobs=None, **fields) -> Rollouts:
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    n, width = adv.shape
    lengths = lengths or [width] * n
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    return Rollouts(
        prompt_ids=torch.ones(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.ones(n, width, dtype=torch.long),
        completion_mask=mask,
        group_ids=torch.arange(n),
        advantages=adv * mask,
        old_logprobs=torch.full((n, width), -1.0) if old_logprobs is None else old_logprobs,
        **fields,
    )


def loss_fn(name: str = "ppo_clip", **options):
    return plugins.get("loss", name)(**options)


def logprobs_at_ratio(r: Rollouts, ratio) -> torch.Tensor:
    """Leaf log-probs with pi / pi_old = ratio (a number or a tensor shaped like the batch)."""
    lp = r.old_logprobs + torch.log(torch.as_tensor(ratio, dtype=torch.float32))
    return lp.detach().clone().requires_grad_(True)


def test_ppo_clip_hand_check():
    r = make_rollouts([1.0])
    loss, stats = loss_fn(clip_low=0.2).compute(r, logprobs_at_ratio(r, 1.5))
    assert_close(loss, torch.tensor(-1.2))  # -min(1.5 * 1, 1.2 * 1)
    assert stats["clip_frac"] == 1.0
    loss, _ = loss_fn(clip_low=0.2, clip_high=0.28).compute(r, logprobs_at_ratio(r, 1.5))
    assert_close(loss, torch.tensor(-1.28))  # DAPO clip-higher
    r = make_rollouts([-1.0])
    loss, _ = loss_fn(clip_low=0.2).compute(r, logprobs_at_ratio(r, 0.5))
    assert_close(loss, torch.tensor(0.8))  # -min(-0.5, -0.8)


def test_on_policy_gradient_is_reinforce_under_each_aggregation():
    adv = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]])
    r = make_rollouts(adv, lengths=[3, 2])
    mask = r.completion_mask.float()
    expected = {
        "token-mean": -adv * mask / 5,
        "seq-mean-token-mean": -adv * mask / torch.tensor([[3.0], [2.0]]) / 2,
        "seq-mean-token-sum": -adv * mask / 2,
        "constant": -adv * mask / (2 * 10),
    }
    for mode, grad in expected.items():
        lp = logprobs_at_ratio(r, 1.0)
        loss, _ = loss_fn(aggregation=mode, normalizer=10).compute(r, lp)
        loss.backward()
        assert_close(lp.grad, grad, msg=mode)


def test_token_mean_weighs_a_300_token_answer_three_times_a_100_token_one():
    r = make_rollouts(torch.ones(2, 300), lengths=[100, 300])
    for mode, ratio in (("token-mean", 3.0), ("seq-mean-token-mean", 1.0)):
        lp = logprobs_at_ratio(r, 1.0)
        loss_fn(aggregation=mode).compute(r, lp)[0].backward()
        weight = lp.grad.sum(-1)
        assert_close(weight[1] / weight[0], torch.tensor(ratio), msg=mode)


def test_dual_clip_caps_the_loss_of_negative_advantages():
    r = make_rollouts([-1.0])
    lp = logprobs_at_ratio(r, 5.0)
    loss, stats = loss_fn(dual_clip=3.0).compute(r, lp)
    assert_close(loss, torch.tensor(3.0))  # min(max(5, 1.2), 3)
    loss.backward()
    assert_close(lp.grad, torch.zeros_like(lp))  # capped: no gradient
    assert stats["dual_clip_frac"] == 1.0
    assert_close(loss_fn().compute(r, logprobs_at_ratio(r, 5.0))[0], torch.tensor(5.0))
    assert_close(loss_fn(dual_clip=3.0).compute(r, logprobs_at_ratio(r, 2.0))[0], torch.tensor(2.0))
    r = make_rollouts([1.0])  # positive advantages are untouched
    assert_close(loss_fn(dual_clip=3.0).compute(r, logprobs_at_ratio(r, 5.0))[0], torch.tensor(-1.2))
    with pytest.raises(ValueError, match="dual_clip"):
        loss_fn(dual_clip=0.5)


def test_truncated_importance_sampling_weights():
    old = torch.full((1, 2), -1.0)
    behavior = old - torch.log(torch.tensor([[2.0, 0.5]]))  # pi_old / mu = [2, 0.5]
    r = make_rollouts([[1.0, 1.0]], old_logprobs=old, behavior_logprobs=behavior)
    fn = loss_fn(tis_cap=1.0)
    assert "behavior_logprobs" in fn.requires
    assert "behavior_logprobs" not in loss_fn().requires
    lp = logprobs_at_ratio(r, 1.0)
    loss, stats = fn.compute(r, lp)
    assert_close(stats["tis_weight_mean"], 0.75)  # weights min([2, 0.5], 1) = [1, 0.5]
    assert_close(loss, torch.tensor(-0.75))
    loss.backward()
    assert_close(lp.grad, -torch.tensor([[1.0, 0.5]]) / 2)


def test_gspo_sequence_ratio():
    # equal per-token ratios r -> sequence ratio r
    r = make_rollouts([[1.0, 1.0, 1.0]])
    loss, stats = loss_fn("gspo", clip_low=0.5, clip_high=0.5).compute(r, logprobs_at_ratio(r, 1.2))
    assert_close(stats["ratio_mean"], 1.2)
    assert_close(loss, torch.tensor(-1.2))
    # unequal ratios: the geometric mean, clipped once per sequence
    ratios = torch.tensor([[2.0, 0.5, 1.0]])
    _, stats = loss_fn("gspo", clip_low=0.5, clip_high=0.5).compute(r, logprobs_at_ratio(r, ratios))
    assert_close(stats["ratio_mean"], 1.0)
    loss, stats = loss_fn("gspo").compute(r, logprobs_at_ratio(r, 1.2))
    assert_close(loss, torch.tensor(-(1 + 4e-4)))  # default clip_high 4e-4
    assert stats["clip_frac"] == 1.0
    # the same through ppo_clip's option; gradient of -s A with s = exp(mean_t log ratio) is -s A / L per token
    lp = logprobs_at_ratio(r, 1.2)
    loss, _ = loss_fn(ratio_level="sequence", clip_low=0.5).compute(r, lp)
    loss.backward()
    assert_close(lp.grad, torch.full((1, 3), -1.2 / 3))
    with pytest.raises(ValueError, match="ratio_level"):
        loss_fn(ratio_level="group")


def test_gspo_ignores_padding_in_the_sequence_ratio():
    r = make_rollouts([[1.0, 1.0, 1.0]], lengths=[2])
    ratios = torch.tensor([[1.1, 1.1, 50.0]])  # the padded token must not count
    _, stats = loss_fn("gspo", clip_low=0.5, clip_high=0.5).compute(r, logprobs_at_ratio(r, ratios))
    assert_close(stats["ratio_mean"], 1.1)


def test_ngrpo_clip_is_asymmetric_by_sign_of_advantage():
    r = make_rollouts([1.0])
    assert_close(loss_fn("ngrpo_clip").compute(r, logprobs_at_ratio(r, 1.3))[0], torch.tensor(-1.24))
    r = make_rollouts([-1.0])
    assert_close(loss_fn("ngrpo_clip").compute(r, logprobs_at_ratio(r, 0.7))[0], torch.tensor(0.84))


def test_kl_estimators_hand_check():
    logprobs = torch.tensor([0.0])
    ref = torch.tensor([math.log(2.0)])  # rho = pi_ref / pi = 2
    assert_close(kl_penalty(logprobs, ref, "k3"), torch.tensor([1 - math.log(2)]))  # 0.307
    assert_close(kl_penalty(logprobs, ref, "k3"), torch.tensor([0.307]), atol=1e-3, rtol=0)
    assert_close(kl_penalty(logprobs, ref, "k1"), torch.tensor([-math.log(2)]))
    assert_close(kl_penalty(logprobs, ref, "k2"), torch.tensor([0.5 * math.log(2) ** 2]))


def test_kl_term_in_the_loss():
    r = make_rollouts([0.0])
    r.ref_logprobs = r.old_logprobs + math.log(2.0)
    fn = loss_fn(kl_coef=0.5, kl_estimator="k3")
    assert "ref_logprobs" in fn.requires
    loss, stats = fn.compute(r, logprobs_at_ratio(r, 1.0))
    assert_close(loss, torch.tensor(0.5 * (1 - math.log(2))))
    assert_close(stats["kl"], 1 - math.log(2))


def test_entropy_of_uniform_is_log_vocab_and_the_bonus_sign():
    assert_close(entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)))
    assert_close(entropy_from_logits(torch.tensor([[0.0, -1e9]])), torch.tensor([0.0]), atol=1e-6, rtol=0)
    r = make_rollouts([0.0])
    ent = torch.full((1, 1), math.log(7))
    assert "entropy" in loss_fn(entropy_coef=0.1).requires
    bonus, _ = loss_fn(entropy_coef=0.1).compute(r, logprobs_at_ratio(r, 1.0), entropy=ent)
    penalty, _ = loss_fn(entropy_coef=-0.1).compute(r, logprobs_at_ratio(r, 1.0), entropy=ent)
    assert_close(bonus, torch.tensor(-0.1 * math.log(7)))
    assert_close(penalty, torch.tensor(0.1 * math.log(7)))


def test_loss_mask_overrides_completion_mask():
    r = make_rollouts([[1.0, 1.0]])
    r.loss_mask = torch.tensor([[0.0, 1.0]])
    lp = logprobs_at_ratio(r, 1.0)
    loss_fn().compute(r, lp)[0].backward()
    assert_close(lp.grad, torch.tensor([[0.0, -1.0]]))


@pytest.mark.parametrize("name", ["ppo_clip", "gspo", "ngrpo_clip"])
def test_losses_are_registered_and_validate_options(name):
    fn = loss_fn(name)
    assert {"advantages", "old_logprobs"} <= set(fn.requires)
    with pytest.raises(ValueError, match="aggregation"):
        loss_fn(name, aggregation="mean")
    with pytest.raises(ValueError, match="tis_cap"):
        loss_fn(name, tis_cap=-1.0)


def test_tis_without_sampler_logprobs_is_a_clear_error():
    r = make_rollouts([1.0])
    with pytest.raises(ValueError, match="behavior_logprobs"):
        loss_fn(tis_cap=2.0).compute(r, logprobs_at_ratio(r, 1.0))


def on_policy_kl_gradients(*estimators: str) -> dict[str, torch.Tensor]:
    """Gradients with respect to the logits of a 6-token distribution pi (fixed random logits), against
    a fixed random pi_ref: of each estimator's expectation over pi (its value weighted by a detached
    pi), and of the exact reverse ("reverse", KL(pi || ref)) and forward ("forward", KL(ref || pi)) KL."""
    torch.manual_seed(0)
    z = torch.randn(6, requires_grad=True)
    ref = torch.log_softmax(torch.randn(6), 0)

    def grad_of(fn):
        lp = torch.log_softmax(z, 0)
        return torch.autograd.grad(fn(lp), z)[0]

    grads = {name: grad_of(lambda lp, name=name: (lp.exp().detach() * kl_penalty(lp, ref, name)).sum())
             for name in estimators}
    grads["reverse"] = grad_of(lambda lp: (lp.exp() * (lp - ref)).sum())
    grads["forward"] = grad_of(lambda lp: (ref.exp() * (ref - lp)).sum())
    return grads


def test_kl_loss_term_gradients_on_policy():
    """Expected over pi, k1 has no gradient, k2 the reverse-KL gradient, k3 the forward-KL gradient."""
    grads = on_policy_kl_gradients("k1", "k2", "k3")
    assert_close(grads["k1"], torch.zeros(6), atol=1e-6, rtol=0)
    assert_close(grads["k2"], grads["reverse"])
    assert_close(grads["k3"], grads["forward"])
