"""Decoding drops finished rows from the batch and its KV cache: the same completions as decoding every
row to the end, in the same order, with the same behaviour log-probs."""

from __future__ import annotations

import pytest
import torch

import rlctl.models.generation as generation
from rlctl.models import Policy, build_tiny_model, load_policy
from rlctl.models.generation import generate
from rlctl.recipe import ModelConfig
from rlctl.rollouts import Prompt

PROMPTS = [Prompt("12+7="), Prompt("3+4="), Prompt("140+9="), Prompt("5+5="), Prompt("1+1="), Prompt("81+19=")]


@pytest.fixture(scope="module")
def stopping_policy(tmp_path_factory):
    """A tiny model made to stop at many different steps: EOS is the most likely token after an input
    token id divisible by 5 (sampling stops at random steps) and from position 12 on (greedy decoding,
    which repeats one token, stops at a step that depends on the prompt's length)."""
    path = build_tiny_model(tmp_path_factory.mktemp("m") / "m", hidden_size=32, num_layers=2, num_heads=2)
    policy = Policy(*load_policy(ModelConfig(name=str(path))))
    eos = policy.tokenizer.eos_token_id
    seen = {}

    def remember(module, args, kwargs):
        seen["ids"], seen["pos"] = kwargs["input_ids"], kwargs["position_ids"]

    def stop_sometimes(module, inputs, logits):
        n = logits.shape[1]
        stop = (seen["ids"][:, -n:] % 5 == 0) | (seen["pos"][:, -n:] >= 12)
        logits = logits.clone()
        logits[..., eos] = torch.where(stop, logits.amax(-1) + 5, logits[..., eos])
        return logits

    policy.model.register_forward_pre_hook(remember, with_kwargs=True)
    policy.model.lm_head.register_forward_hook(stop_sometimes)
    return policy


def _run(policy, monkeypatch, compact: bool, seed: int = 0, **kw):
    monkeypatch.setenv("RLCTL_DECODE_COMPACT", "1" if compact else "0")
    calls = []
    real = generation._worth_compacting
    monkeypatch.setattr(generation, "_worth_compacting", lambda u: calls.append(real(u)) or calls[-1])
    torch.manual_seed(seed)
    r = generate(policy, PROMPTS, 3, max_new_tokens=24, record_logprobs=True, **kw)
    return r, sum(calls)


def test_greedy_decoding_is_identical_with_and_without_compaction(stopping_policy, monkeypatch):
    with_rows_dropped, drops = _run(stopping_policy, monkeypatch, True, do_sample=False)
    every_row, _ = _run(stopping_policy, monkeypatch, False, do_sample=False)
    lengths = with_rows_dropped.completion_mask.sum(1)
    assert drops > 0 and lengths.min() < lengths.max()  # rows did finish early and did leave the batch
    assert torch.equal(with_rows_dropped.completion_ids, every_row.completion_ids)
    assert torch.equal(with_rows_dropped.completion_mask, every_row.completion_mask)
    torch.testing.assert_close(with_rows_dropped.behavior_logprobs, every_row.behavior_logprobs)


def test_sampling_with_compaction_is_seeded_and_scores_what_it_drew(stopping_policy, monkeypatch):
    """Sampled rows: the same seed gives the same tokens; each behaviour log-prob is the sampled token's
    log-prob under the model (rescored in one forward), so rows kept their place and their cache."""
    from rlctl.models import score_completions

    first, drops = _run(stopping_policy, monkeypatch, True, seed=3, temperature=1.0)
    again, _ = _run(stopping_policy, monkeypatch, True, seed=3, temperature=1.0)
    assert drops > 0
    assert torch.equal(first.completion_ids, again.completion_ids)
    with torch.no_grad():
        rescored = score_completions(stopping_policy.model, first).logprobs
    mask = first.completion_mask.bool()
    torch.testing.assert_close(first.behavior_logprobs[mask], rescored[mask], atol=1e-4, rtol=1e-4)
    # the first step runs before any row finishes: its draws match decoding every row to the end
    every_row, _ = _run(stopping_policy, monkeypatch, False, seed=3, temperature=1.0)
    assert torch.equal(first.completion_ids[:, 0], every_row.completion_ids[:, 0])
