"""Preference optimisation: the pairs sampler and pairwise losses (ALGORITHMS.md section 4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from rlctl import plugins
from rlctl.models import Policy, build_tokenizer, score_completions
from rlctl.rollouts import Prompt, Rollouts


def pairs_rollouts(lengths, ref=None, infos=None, roles=True) -> Rollouts:
    """Rows 2k (chosen) and 2k+1 (rejected) with the given completion lengths, right-padded."""
    n, width = len(lengths), max(lengths)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    infos = infos or [{} for _ in range(n // 2)]
    rows = []
    for k in range(n):
        info = dict(infos[k // 2])
        if roles:
            info["pair_role"] = "chosen" if k % 2 == 0 else "rejected"
        rows.append(info)
    return Rollouts(
        prompt_ids=torch.ones(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=mask.clone(),
        completion_mask=mask,
        group_ids=torch.arange(n // 2).repeat_interleave(2),
        prompts=[""] * n,
        completions=[""] * n,
        info=rows,
        ref_logprobs=ref,
    )


def token_logprobs(per_row_values, width, pad=-50.0) -> torch.Tensor:
    """[N, T] log-probs: row i holds its listed values, padding holds ``pad`` (must be ignored)."""
    out = torch.full((len(per_row_values), width), pad)
    for i, values in enumerate(per_row_values):
        out[i, : len(values)] = torch.tensor(values)
    return out


def loss(name, **options):
    return plugins.get("loss", name)(**options)


# One pair: chosen tokens (-0.5, -0.5), rejected tokens (-1, -1, -1); reference -1 per chosen token,
# -2/3 per rejected token. Sequence log-probs: pi_w = -1, pi_l = -3, ref_w = -2, ref_l = -2 -> h = 2.
LENGTHS = [2, 3]
POLICY = token_logprobs([[-0.5, -0.5], [-1.0, -1.0, -1.0]], 3)
REF = token_logprobs([[-1.0, -1.0], [-2 / 3, -2 / 3, -2 / 3]], 3, pad=7.0)


def hand_batch(**kwargs) -> Rollouts:
    return pairs_rollouts(LENGTHS, ref=REF, **kwargs)


# ------------------------------------------------------------------------------------------- dpo
def test_dpo_at_reference_is_log2():
    logprobs = token_logprobs([[-1.0, -2.0], [-0.3, -0.1, -4.0], [-2.0], [-1.0, -1.0]], 3)
    rollouts = pairs_rollouts([2, 3, 1, 2], ref=logprobs.clone())
    value, stats = loss("dpo", beta=0.1).compute(rollouts, logprobs)
    assert_close(value, torch.tensor(math.log(2)))
    assert stats["margin"] == 0.0 and stats["reward_accuracy"] == 0.0


def test_dpo_hand_computed():
    value, stats = loss("dpo", beta=0.5).compute(hand_batch(), POLICY)
    assert_close(value, torch.tensor(math.log1p(math.exp(-1.0))))  # -log sigmoid(0.5 * 2) = 0.3133
    assert stats["reward_accuracy"] == 1.0
    assert stats["margin"] == pytest.approx(1.0)  # beta * h
    assert stats["chosen_reward"] == pytest.approx(0.5) and stats["rejected_reward"] == pytest.approx(-0.5)


def test_dpo_gradient_raises_chosen_and_lowers_rejected_logprobs():
    logprobs = POLICY.clone().requires_grad_(True)
    value, _ = loss("dpo", beta=0.5).compute(hand_batch(), logprobs)
    value.backward()
    grad = logprobs.grad
    assert (grad[0, :2] < 0).all()  # gradient descent increases the chosen log-probs
    assert (grad[1, :3] > 0).all()  # and decreases the rejected ones
    assert grad[0, 2] == 0  # padding gets no gradient
    assert_close(grad[0, 0], torch.tensor(-0.5 * torch.sigmoid(torch.tensor(-1.0)).item()))


def test_pairs_match_by_role_after_shuffling():
    logprobs = token_logprobs([[-1.0], [-3.0], [-2.0], [-2.5], [-0.1], [-0.2]], 1)
    ref = torch.zeros_like(logprobs)
    rollouts = pairs_rollouts([1] * 6, ref=ref)
    dpo = loss("dpo", beta=1.0)
    expected, _ = dpo.compute(rollouts, logprobs)
    order = torch.tensor([5, 2, 0, 3, 1, 4])
    shuffled = rollouts.select(order)
    got, stats = dpo.compute(shuffled, logprobs[order])
    assert_close(got, expected)
    # pair margins 2, 0.5, 0.1 -> all chosen rewards exceed rejected ones
    assert stats["reward_accuracy"] == 1.0 and stats["margin"] == pytest.approx((2 + 0.5 + 0.1) / 3)


@pytest.mark.parametrize("select, message", [
    ([0, 1, 2], "groups \\[1\\] have only one row"),
    ([0, 0], "two chosen rows"),
])
def test_split_pairs_are_rejected(select, message):
    rollouts = pairs_rollouts([1, 1, 1, 1], ref=torch.zeros(4, 1)).select(select)
    with pytest.raises(ValueError, match=message):
        loss("dpo").compute(rollouts, torch.zeros(len(select), 1))


def test_unmarked_rows_use_the_positional_layout():
    rollouts = pairs_rollouts(LENGTHS, ref=REF, roles=False)
    assert_close(loss("dpo", beta=0.5).compute(rollouts, POLICY)[0], torch.tensor(math.log1p(math.exp(-1.0))))
    odd = pairs_rollouts([1, 1, 1, 1], ref=torch.zeros(4, 1), roles=False).select([0, 1, 2])
    with pytest.raises(ValueError, match="use sampler 'pairs'"):
        loss("dpo").compute(odd, torch.zeros(3, 1))


def test_dpo_needs_reference_logprobs():
    dpo = loss("dpo")
    assert dpo.requires == ("ref_logprobs",)
    with pytest.raises(ValueError, match="ref_logprobs"):
        dpo.compute(pairs_rollouts(LENGTHS), POLICY)


# ------------------------------------------------------------------------------------------- ipo
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_at_reference(beta):
    rollouts = pairs_rollouts(LENGTHS, ref=POLICY.clone())
    value, _ = loss("ipo", beta=beta).compute(rollouts, POLICY)
    assert_close(value, torch.tensor((1 / (2 * beta)) ** 2))


def test_ipo_hand_computed():
    value, stats = loss("ipo", beta=0.25).compute(hand_batch(), POLICY)
    assert_close(value, torch.tensor(0.0))  # h = 2 = 1 / (2 * 0.25): at the target margin
    value, _ = loss("ipo", beta=1.0).compute(hand_batch(), POLICY)
    assert_close(value, torch.tensor(1.5**2))  # (2 - 0.5)^2


# ----------------------------------------------------------------------------------------- simpo
def test_simpo_hand_computed_and_reference_free():
    simpo = loss("simpo", beta=2.0, gamma=0.5)
    assert simpo.requires == ()
    # average log-probs: chosen -0.5, rejected -1 -> 2 * (-0.5 + 1) - 0.5 = 0.5
    value, stats = simpo.compute(pairs_rollouts(LENGTHS), POLICY)
    assert_close(value, torch.tensor(math.log1p(math.exp(-0.5))))
    assert stats["margin"] == pytest.approx(1.0) and stats["reward_accuracy"] == 1.0


def test_simpo_is_length_normalised():
    # same per-token log-prob, different lengths: zero reward margin, loss -log sigmoid(-gamma)
    logprobs = token_logprobs([[-1.0] * 2, [-1.0] * 5], 5)
    value, stats = loss("simpo", beta=2.0, gamma=0.5).compute(pairs_rollouts([2, 5]), logprobs)
    assert_close(value, torch.tensor(math.log1p(math.exp(0.5))))
    assert stats["margin"] == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------ rdpo
def test_rdpo_with_zero_eps_equals_dpo():
    dpo, _ = loss("dpo", beta=0.5).compute(hand_batch(), POLICY)
    rdpo, _ = loss("rdpo", beta=0.5, eps=0.0).compute(hand_batch(), POLICY)
    assert_close(rdpo, dpo)


def test_rdpo_hand_computed_and_unbiased():
    eps, x = 0.2, 1.0  # beta * h = 0.5 * 2
    forward, flipped = math.log1p(math.exp(-x)), math.log1p(math.exp(x))
    value, _ = loss("rdpo", beta=0.5, eps=eps).compute(hand_batch(), POLICY)
    assert_close(value, torch.tensor(((1 - eps) * forward - eps * flipped) / (1 - 2 * eps)))
    # a label observed flipped with probability eps: the expected robust loss is the clean DPO loss
    swapped = token_logprobs([[-1.0, -1.0, -1.0], [-0.5, -0.5]], 3)
    swapped_ref = token_logprobs([[-2 / 3] * 3, [-1.0, -1.0]], 3)
    flipped_batch = pairs_rollouts([3, 2], ref=swapped_ref)
    value_flipped, _ = loss("rdpo", beta=0.5, eps=eps).compute(flipped_batch, swapped)
    assert_close((1 - eps) * value + eps * value_flipped, torch.tensor(forward))


# ------------------------------------------------------------------------------------ margin_dpo
def test_margin_dpo():
    zero, _ = loss("margin_dpo", beta=0.5).compute(hand_batch(infos=[{"margin": 0.0}]), POLICY)
    dpo, _ = loss("dpo", beta=0.5).compute(hand_batch(), POLICY)
    assert_close(zero, dpo)
    # beta * h = 1 and margin 1 -> -log sigmoid(0) = log 2
    value, stats = loss("margin_dpo", beta=0.5).compute(hand_batch(infos=[{"margin": 1.0}]), POLICY)
    assert_close(value, torch.tensor(math.log(2)))
    assert stats["target_margin"] == 1.0
    scaled, _ = loss("margin_dpo", beta=0.5, margin_key="gap", margin_scale=0.5).compute(
        hand_batch(infos=[{"gap": 2.0}]), POLICY)
    assert_close(scaled, torch.tensor(math.log(2)))
    with pytest.raises(ValueError, match="needs info\\['margin'\\]"):
        loss("margin_dpo").compute(hand_batch(), POLICY)


@pytest.mark.parametrize("name, options, message", [
    ("dpo", {"beta": 0.0}, "beta = 0.0"),
    ("ipo", {"beta": -1.0}, "beta = -1.0"),
    ("simpo", {"beta": 0.0}, "beta = 0.0"),
    ("rdpo", {"eps": 0.5}, "eps = 0.5"),
    ("rdpo", {"eps": -0.1}, "eps = -0.1"),
    ("margin_dpo", {"beta": 0.0}, "beta = 0.0"),
])
def test_loss_validation(name, options, message):
    with pytest.raises(ValueError, match=message):
        loss(name, **options)


def test_reference_requirements():
    for name in ("dpo", "ipo", "rdpo", "margin_dpo"):
        assert loss(name).requires == ("ref_logprobs",)
    assert loss("simpo").requires == ()


# ---------------------------------------------------------------------------------- pairs sampler
PROMPTS = [
    Prompt("Q: 2+2? A:", answer="4", info={"chosen": " 4", "rejected": " five", "margin": 1.0}),
    Prompt("Say hi:", info={"chosen": " hi there", "rejected": " no"}),
]


def test_pairs_sampler_layout():
    tok = build_tokenizer()
    policy = Policy(model=torch.nn.Linear(1, 1), tokenizer=tok)
    sampler = plugins.get("sampler", "pairs")()
    rollouts = sampler.sample(policy, PROMPTS, group_size=8)  # group_size is ignored
    assert len(rollouts) == 4
    assert rollouts.completions == [" 4", " five", " hi there", " no"]
    assert rollouts.group_ids.tolist() == [0, 0, 1, 1]
    assert [i["pair_role"] for i in rollouts.info] == ["chosen", "rejected", "chosen", "rejected"]
    assert rollouts.info[0]["answer"] == "4" and rollouts.info[1]["margin"] == 1.0
    assert rollouts.lengths.tolist() == [3, 6, 10, 4]  # characters + EOS
    assert rollouts.completion_ids[1, 5].item() == tok.eos_token_id
    assert (rollouts.completion_ids[rollouts.completion_mask == 0] == tok.pad_token_id).all()
    assert rollouts.prompts == ["Q: 2+2? A:", "Q: 2+2? A:", "Say hi:", "Say hi:"]
    assert torch.equal(rollouts.prompt_ids[0], rollouts.prompt_ids[1])
    assert rollouts.prompt_mask.sum(1).tolist() == [10, 10, 7, 7]  # left-padded prompts


def test_pairs_sampler_options_and_errors():
    policy = Policy(model=torch.nn.Linear(1, 1), tokenizer=build_tokenizer())
    cut = plugins.get("sampler", "pairs")(append_eos=False, max_completion_tokens=3)
    assert cut.sample(policy, PROMPTS, 2).completions == [" 4", " fi", " hi", " no"]
    keyed = plugins.get("sampler", "pairs")(chosen_key="good", rejected_key="bad")
    rollouts = keyed.sample(policy, [Prompt("p", info={"good": "a", "bad": "b"})], 2)
    assert rollouts.completions == ["a", "b"]
    with pytest.raises(ValueError, match="info\\['rejected'\\] must be the completion text"):
        plugins.get("sampler", "pairs")().sample(policy, [Prompt("p", info={"chosen": "a"})], 2)
    with pytest.raises(ValueError, match="max_completion_tokens = -1"):
        plugins.get("sampler", "pairs")(max_completion_tokens=-1)


def test_pairs_sampler_with_model_gives_log2_dpo_at_reference(tiny_policy):
    rollouts = plugins.get("sampler", "pairs")().sample(tiny_policy, PROMPTS, 2)
    with torch.no_grad():
        logprobs = score_completions(tiny_policy.model, rollouts).logprobs
    rollouts.ref_logprobs = logprobs.clone()
    value, _ = loss("dpo", beta=0.1).compute(rollouts, logprobs)
    assert_close(value, torch.tensor(math.log(2)))
    # sequence log-probs are sums over the completion mask only
    seq = (logprobs * rollouts.completion_mask).sum(-1)
    simpo, _ = loss("simpo", beta=1.0, gamma=0.0).compute(rollouts, logprobs)
    avg = seq / rollouts.lengths
    expected = -F.logsigmoid(avg[0::2] - avg[1::2]).mean()
    assert_close(simpo, expected)
