"""Off-policy corrections against the sampler's log-probs (TIS, sequence TIS, masked IS / IcePop):
hand-computed losses, gradients and the logged fractions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tests.test_policy_losses import loss_fn, logprobs_at_ratio, make_rollouts


def token_batch():
    """One sequence of 3 tokens, A = 1, pi_old / mu = [4, 1, 0.25]."""
    old = torch.full((1, 3), -1.0)
    behavior = old - torch.log(torch.tensor([[4.0, 1.0, 0.25]]))
    return make_rollouts([[1.0, 1.0, 1.0]], old_logprobs=old, behavior_logprobs=behavior)


def test_icepop_masks_tokens_outside_the_range():
    """mask [0.5, 2]: only the middle token (w = 1) is kept with weight 1.

    At ratio pi / pi_old = 1 each token's surrogate is -1; token-mean over 3 tokens: (0 - 1 + 0) / 3.
    d loss / d log pi = -w_t / 3 = [0, -1/3, 0]; 2 of 3 tokens masked.
    """
    r = token_batch()
    fn = loss_fn(mask_low=0.5, mask_high=2.0)
    assert "behavior_logprobs" in fn.requires
    lp = logprobs_at_ratio(r, 1.0)
    loss, stats = fn.compute(r, lp)
    assert_close(loss, torch.tensor(-1 / 3))
    assert stats["is_masked_frac"] == pytest.approx(2 / 3)
    assert stats["tis_weight_mean"] == pytest.approx(1 / 3)
    loss.backward()
    assert_close(lp.grad, torch.tensor([[0.0, -1 / 3, 0.0]]))


def test_token_tis_truncates_and_counts_the_clipped():
    """cap 2: weights min([4, 1, 0.25], 2) = [2, 1, 0.25]; loss -(2 + 1 + 0.25) / 3; 1 of 3 clipped."""
    r = token_batch()
    loss, stats = loss_fn(tis_cap=2.0).compute(r, logprobs_at_ratio(r, 1.0))
    assert_close(loss, torch.tensor(-3.25 / 3))
    assert stats["tis_clipped_frac"] == pytest.approx(1 / 3)
    assert stats["tis_weight_mean"] == pytest.approx(3.25 / 3)


def test_mask_then_truncate():
    """mask [0.5, 5] keeps w = 4 and 1, drops 0.25; cap 2 -> weights [2, 1, 0]; loss -3 / 3."""
    r = token_batch()
    loss, stats = loss_fn(tis_cap=2.0, mask_low=0.5, mask_high=5.0).compute(r, logprobs_at_ratio(r, 1.0))
    assert_close(loss, torch.tensor(-1.0))
    assert stats["is_masked_frac"] == pytest.approx(1 / 3) and stats["tis_clipped_frac"] == pytest.approx(1 / 3)


def sequence_batch():
    """Row 0: two tokens, w = [2, 2] (product 4); row 1: one token, w = 0.5, then padding whose
    behaviour log-prob is garbage (it must not enter the product)."""
    old = torch.full((2, 2), -1.0)
    behavior = old - torch.log(torch.tensor([[2.0, 2.0], [0.5, 1.0]]))
    behavior[1, 1] = 9.0
    return make_rollouts([[1.0, 1.0], [1.0, 1.0]], lengths=[2, 1], old_logprobs=old, behavior_logprobs=behavior)


def test_sequence_tis():
    """Sequence weights min(4, 2) = 2 and min(0.5, 2) = 0.5 on each of their tokens; token-mean over the
    3 real tokens: -(2 + 2 + 0.5) / 3 = -1.5. Row 0's 2 tokens are clipped: 2/3."""
    r = sequence_batch()
    loss, stats = loss_fn(tis_cap=2.0, tis_level="sequence").compute(r, logprobs_at_ratio(r, 1.0))
    assert_close(loss, torch.tensor(-1.5))
    assert stats["tis_clipped_frac"] == pytest.approx(2 / 3)


def test_sequence_mask_drops_whole_sequences():
    """Range [0.25, 2]: row 0 (product 4) is dropped, row 1 (0.5) kept: -(0 + 0 + 1) / 3."""
    r = sequence_batch()
    lp = logprobs_at_ratio(r, 1.0)
    loss, stats = loss_fn(tis_level="sequence", mask_low=0.25, mask_high=2.0).compute(r, lp)
    assert_close(loss, torch.tensor(-1 / 3))
    assert stats["is_masked_frac"] == pytest.approx(2 / 3)
    loss.backward()
    assert_close(lp.grad, torch.tensor([[0.0, 0.0], [-1 / 3, 0.0]]))  # no gradient through the weights


def test_gspo_takes_the_same_corrections():
    r = token_batch()
    _, stats = loss_fn("gspo", mask_low=0.5, mask_high=2.0).compute(r, logprobs_at_ratio(r, 1.0))
    assert stats["is_masked_frac"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("options, message", [
    ({"tis_level": "batch"}, "tis_level = 'batch': accepted values are token, sequence"),
    ({"mask_low": 2.0, "mask_high": 1.0}, "need 0 <= mask_low < mask_high"),
    ({"tis_cap": -1.0}, "tis_cap = -1.0"),
])
def test_bad_options_are_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        loss_fn(**options)


def test_without_behaviour_logprobs_the_error_names_the_keys():
    r = make_rollouts([1.0])
    with pytest.raises(ValueError, match=r"tis_cap / mask_high need the sampler's log-probs"):
        loss_fn(mask_high=2.0).compute(r, logprobs_at_ratio(r, 1.0))
    assert math.isfinite(float(loss_fn().compute(r, logprobs_at_ratio(r, 1.0))[0].detach()))
