"""Train/inference parity metrics: hand-computed values, micro-batch invariance, and the learner logs them."""

from __future__ import annotations

import math

import pytest
import torch

from rlctl.testing import run_recipe, tiny_model
from rlctl.train.parity import Parity

TRAINER = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
SAMPLER = torch.tensor([[-1.5, -2.0, -9.0], [-0.5, -0.25, -0.75]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])


def test_hand_computed_parity():
    """diff = trainer - sampler on masked tokens: row 0 [0.5, 0], row 1 [0, -0.25, 0.25].

    mean |diff| = (0.5 + 0 + 0 + 0.25 + 0.25) / 5 = 0.2; max 0.5 (the masked -9.0 never counts);
    sequence log-ratios 0.5 and 0.0 -> ratios e^0.5 = 1.6487 and 1.0.
    """
    p = Parity()
    p.add(TRAINER, SAMPLER, MASK)
    m = p.metrics()
    assert m["parity_logp_mean_abs"] == pytest.approx(0.2)
    assert m["parity_logp_max_abs"] == pytest.approx(0.5)
    assert m["parity_seq_ratio_min"] == pytest.approx(1.0)
    assert m["parity_seq_ratio_max"] == pytest.approx(math.exp(0.5))


def test_parity_over_micro_batches_equals_one_pass():
    whole, parts = Parity(), Parity()
    whole.add(TRAINER, SAMPLER, MASK)
    for i in range(2):
        parts.add(TRAINER[i:i + 1], SAMPLER[i:i + 1], MASK[i:i + 1])
    assert parts.metrics() == pytest.approx(whole.metrics())


def test_no_tokens_no_metrics():
    p = Parity()
    p.add(TRAINER, SAMPLER, torch.zeros_like(MASK))
    assert p.metrics() == {}


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_a_run_with_behaviour_logprobs_logs_parity(tmp_path, mini_batches):
    """The nested sampler's gap is positive while it skips blocks and zero once it samples with all of them."""
    model = tiny_model(tmp_path / "m", hidden_size=32, num_layers=4, num_heads=2)
    rows = run_recipe("recipes/nested_reft.toml", steps=3, model=model, output_dir=tmp_path / "run", overrides=[
        "sampler.max_new_tokens=4", "train.prompts_per_step=2", "train.group_size=4",
        f"train.mini_batches={mini_batches}"])
    logged = [r for r in rows if "parity_logp_mean_abs" in r]
    assert {r["skipped_layers"] for r in logged} == {0.0, 1.0}, rows
    for r in logged:
        if r["skipped_layers"]:
            assert 0 < r["parity_logp_mean_abs"] <= r["parity_logp_max_abs"] < math.inf
            assert 0 < r["parity_seq_ratio_min"] < r["parity_seq_ratio_max"]
        else:
            assert r["parity_logp_max_abs"] < 1e-5
            assert r["parity_seq_ratio_min"] == pytest.approx(1.0, abs=1e-4) == r["parity_seq_ratio_max"]


def test_processes_report_the_extremes_of_their_extremes():
    """Two processes: the largest gap and the widest ratio range of either, the mean of the means."""
    from types import SimpleNamespace

    from rlctl.train.engine import reduce_metrics

    mine = {"step": 3, "parity_logp_mean_abs": 0.1, "parity_logp_max_abs": 0.5,
            "parity_seq_ratio_min": 0.9, "parity_seq_ratio_max": 1.2}
    other = {"step": 3, "parity_logp_mean_abs": 0.3, "parity_logp_max_abs": 2.0,
             "parity_seq_ratio_min": 0.4, "parity_seq_ratio_max": 1.1}
    engine = SimpleNamespace(num_processes=2, gather_objects=lambda m: [m, other])
    out = reduce_metrics(engine, mine)
    assert out["parity_logp_mean_abs"] == pytest.approx(0.2)
    assert (out["parity_logp_max_abs"], out["parity_seq_ratio_min"], out["parity_seq_ratio_max"]) == (2.0, 0.4, 1.2)
