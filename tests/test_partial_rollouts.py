"""Partial rollouts: completions under way when newer weights arrive continue with them.

Checked on the tiny model and on SmolLM2-135M-Instruct: the tokens drawn before the switch carry the old
version and the old policy's log-probs, those after it the new version and exactly the new policy's
log-probs (the cache of the tokens so far is recomputed by the new weights); without a switch decoding is
unchanged token for token; a real asynchronous run with partial rollouts records versions per token and
keeps the staleness bound; what cannot run them fails with one line.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import grpo_recipe, write_recipe
from test_async import varied_reward  # noqa: F401 (a fixture)
from rlctl import plugins
from rlctl.errors import RecipeError, RlctlError
from rlctl.models import Policy, load_policy, score_completions
from rlctl.models.generation import generate
from rlctl.recipe import ModelConfig, load_recipe
from rlctl.rollouts import Prompt
from rlctl.trainer import Trainer

SWITCH_AFTER = 3  # tokens drawn by the first weights


class SwitchWeights:
    """A ``Policy.refresh`` that loads ``newer`` into the model once ``SWITCH_AFTER`` tokens are drawn.

    ``_decode`` calls it once before the first token and once after every token but the last, so its
    call number ``SWITCH_AFTER + 1`` comes right after token ``SWITCH_AFTER`` was drawn."""

    def __init__(self, model, newer_state):
        self.model, self.newer, self.calls = model, newer_state, 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls == SWITCH_AFTER + 1:
            self.model.load_state_dict(self.newer)
        return int(self.calls > SWITCH_AFTER)


def _perturbed(model, scale: float, seed: int = 0):
    """A copy of ``model`` with every weight moved by noise of ``scale`` times its own spread."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else 1.0))
    return other


def _prompts(texts):
    return [Prompt(text=t) for t in texts]


def _check_switch(model, tokenizer, texts, max_new_tokens, group_size=2, scale=0.3):
    old = copy.deepcopy(model)
    new = _perturbed(model, scale)
    newer_state = {k: v.clone() for k, v in new.state_dict().items()}
    policy = Policy(model, tokenizer, refresh=SwitchWeights(model, newer_state))
    torch.manual_seed(0)
    batch = generate(policy, _prompts(texts), group_size, max_new_tokens=max_new_tokens, record_logprobs=True)
    real = batch.completion_mask.bool()
    assert batch.token_versions is not None
    assert batch.completion_ids.shape[1] > SWITCH_AFTER, "every completion ended before the switch"
    # versions: 0 for the first tokens, 1 after the switch (pads: 0)
    assert torch.equal(batch.token_versions[:, :SWITCH_AFTER][real[:, :SWITCH_AFTER]],
                       torch.zeros(int(real[:, :SWITCH_AFTER].sum()), dtype=torch.long))
    after = real.clone()
    after[:, :SWITCH_AFTER] = False
    assert after.any(), "no completion went on past the switch"
    assert bool((batch.token_versions[after] == 1).all())
    assert int(batch.token_versions[~real].abs().sum()) == 0
    # behaviour log-probs: the old policy's before the switch, the new policy's after it
    with torch.no_grad():
        by_old = score_completions(old.eval(), batch).logprobs
        by_new = score_completions(new.eval(), batch).logprobs
    before = real & ~after
    torch.testing.assert_close(batch.behavior_logprobs[before], by_old[before], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(batch.behavior_logprobs[after], by_new[after], atol=2e-4, rtol=1e-4)
    # and the two policies really differ there: the check above could fail
    assert (by_old[after] - by_new[after]).abs().max() > 1e-2
    return batch


def test_tokens_after_a_weight_update_come_from_the_new_weights(tiny_model_dir):
    """Prompts of different lengths (left padding) and groups of 2: the recomputed cache keeps the
    positions and the padding mask of the first one."""
    model, tokenizer = load_policy(ModelConfig(name=str(tiny_model_dir)))
    _check_switch(model, tokenizer, ["1 + 2 =", "12 + 13 + 14 + 15 ="], max_new_tokens=10)


@pytest.mark.real
def test_tokens_after_a_weight_update_come_from_the_new_weights_real_model(real_model_dir):
    """The same on SmolLM2-135M-Instruct (chat prompts of different lengths, small weight noise)."""
    model, tokenizer = load_policy(ModelConfig(name=str(real_model_dir)))
    _check_switch(model, tokenizer, ["What is 7 times 8?", "Name a colour of the sky at noon on a clear day."],
                  max_new_tokens=8, scale=0.02)


def test_no_new_weights_decodes_exactly_as_without_refresh(tiny_model_dir):
    model, tokenizer = load_policy(ModelConfig(name=str(tiny_model_dir)))
    texts = ["3 + 4 =", "10 + 20 + 30 ="]
    torch.manual_seed(1)
    plain = generate(Policy(model, tokenizer), _prompts(texts), 3, max_new_tokens=12, record_logprobs=True)
    torch.manual_seed(1)
    calls = []
    same = generate(Policy(model, tokenizer, refresh=lambda: calls.append(1) or 7), _prompts(texts), 3,
                    max_new_tokens=12, record_logprobs=True)
    assert torch.equal(plain.completion_ids, same.completion_ids)
    assert torch.equal(plain.behavior_logprobs, same.behavior_logprobs)
    assert plain.token_versions is None
    assert bool((same.token_versions[same.completion_mask.bool()] == 7).all())
    assert len(calls) >= plain.completion_ids.shape[1]  # asked between every pair of tokens


def _train(tmp_path, model_dir, extra, name):
    text = grpo_recipe(model_dir, steps=6, extra=extra).replace("max_new_tokens = 4", "max_new_tokens = 48")
    return Trainer(load_recipe(write_recipe(tmp_path, text, name)), output_dir=tmp_path / name.split(".")[0],
                   show_progress=False)


@pytest.mark.slow
def test_asynchronous_run_with_partial_rollouts(tmp_path, tiny_model_dir, varied_reward):
    """One worker, k = 1, long completions: the learner's weight updates land while the worker decodes,
    so some completions span two versions; the staleness bound holds for the oldest token of each."""
    from rlctl.metrics import read_metrics

    trainer = _train(tmp_path, tiny_model_dir, "max_staleness = 1\npartial_rollouts = true", "p.toml")
    trainer.run()
    rows = [m for m in read_metrics(tmp_path / "p" / "metrics.jsonl") if "staleness_max" in m]  # train steps
    assert len(rows) == 6
    for m in rows:
        assert m["staleness_max"] <= 1
        assert 0 <= m["token_staleness"] <= 1
        assert 0 <= m["partial_frac"] <= 1
    assert max(m["partial_frac"] for m in rows) > 0, [m["partial_frac"] for m in rows]


def test_partial_rollouts_need_asynchronous_rollouts(tmp_path, tiny_model_dir):
    path = write_recipe(tmp_path, grpo_recipe(tiny_model_dir, extra="partial_rollouts = true"))
    with pytest.raises(RecipeError, match=r"partial_rollouts = true: needs max_staleness >= 1") as err:
        load_recipe(path)
    assert "\n" not in str(err.value).strip().splitlines()[-1]


def test_a_sampler_without_partial_rollouts_is_refused(tmp_path, tiny_model_dir):
    from rlctl.train.async_source import check_async_stage

    recipe = load_recipe(write_recipe(tmp_path, grpo_recipe(
        tiny_model_dir, extra="max_staleness = 1\npartial_rollouts = true")))
    stage = recipe.stages[0]

    class WholeBatchSampler:  # e.g. a server that samples each batch with one set of weights
        def sample(self, policy, prompts, group_size):
            raise AssertionError("not called")

    with pytest.raises(RlctlError, match=r"partial_rollouts = true: sampler 'hf' cannot change weights part-way"):
        check_async_stage(stage, WholeBatchSampler(), 1)
    check_async_stage(stage, plugins.get("sampler", "hf")(), 1)  # the hf sampler can


def test_model_generate_takes_one_version_for_the_whole_batch(tiny_model_dir, monkeypatch):
    """Decoding through ``model.generate`` (several calls with ``batch_size``) cannot switch weights
    part-way: the newest weights are asked for once, before the first call, and tag every token."""
    from rlctl.models import generation

    monkeypatch.setattr(generation, "use_fast_decoding", lambda model: False)
    model, tokenizer = load_policy(ModelConfig(name=str(tiny_model_dir)))
    versions = iter(range(5, 100))
    calls = []

    def refresh():
        calls.append(1)
        return next(versions)

    batch = generate(Policy(model, tokenizer, refresh=refresh), _prompts(["1 + 1 =", "2 + 2 =", "3 + 3 ="]), 2,
                     max_new_tokens=4, batch_size=1)
    assert len(calls) == 1
    assert bool((batch.token_versions[batch.completion_mask.bool()] == 5).all())
