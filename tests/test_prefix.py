"""Prefix sampling (ALGORITHMS.md section 3): demonstration prefix + policy continuation; NLL on the prefix
tokens, clipped policy gradient on the rest; the two masks partition the completion."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch.testing import assert_close

from conftest import grpo_recipe, write_recipe
from rlctl import plugins, testing
from rlctl.errors import RecipeError
from rlctl.generation import encode_prompts
from rlctl.metrics import read_metrics
from rlctl.models import Policy
from rlctl.recipe import load_recipe
from rlctl.rollouts import Prompt
from rlctl.trainer import Trainer
from rlctl_plugins.prefix import prefix_masks

LOG_HALF = math.log(0.5)


def prefix_sampler(**options):
    return plugins.get("sampler", "prefix")(**options)


def prefix_loss(**options):
    return plugins.get("loss", "prefix_pg")(**options)


# ---------------------------------------------------------------------------------------- masks
def test_prefix_and_continuation_masks_partition_the_completion_mask():
    batch = testing.fake_rollouts(lengths=[5, 3, 4, 2], max_length=6,
                                  info=[{"prefix_len": 2}, {"prefix_len": 0}, {"prefix_len": 4}, {}])
    prefix, continuation = prefix_masks(batch)
    assert_close(prefix + continuation, batch.completion_mask.float())
    assert (prefix * continuation).sum() == 0
    assert prefix.sum(1).tolist() == [2, 0, 4, 0]
    assert continuation.sum(1).tolist() == [3, 3, 0, 2]
    assert prefix[0].tolist() == [1, 1, 0, 0, 0, 0]


def test_prefix_longer_than_the_completion_stays_inside_it():
    batch = testing.fake_rollouts(lengths=[2], max_length=4, info=[{"prefix_len": 9}])
    prefix, continuation = prefix_masks(batch)
    assert prefix.tolist() == [[1, 1, 0, 0]] and continuation.sum() == 0


# ----------------------------------------------------------------------------------------- loss
def test_prefix_pg_hand_check():
    # row 0: 2 prefix + 2 continuation tokens; row 1: 4 continuation tokens; A = 1, ratio 1
    batch = testing.fake_rollouts(lengths=[4, 4], advantages=1.0, old_logprobs=LOG_HALF,
                                  info=[{"prefix_len": 2}, {"prefix_len": 0}])
    logprobs = torch.full((2, 4), LOG_HALF, requires_grad=True)
    loss, stats = prefix_loss(sft_coef=2.0).compute(batch, logprobs)
    assert_close(loss, torch.tensor(-1.0 + 2.0 * math.log(2)))  # PG: -ratio A = -1; NLL: log 2
    assert stats["prefix_nll"] == pytest.approx(math.log(2)) and stats["pg_loss"] == pytest.approx(-1.0)
    assert stats["prefix_frac"] == pytest.approx(2 / 8)
    loss.backward()
    grad = logprobs.grad
    assert_close(grad[0, :2], torch.full((2,), -2.0 / 2))  # NLL over the 2 prefix tokens, times sft_coef
    assert_close(grad[0, 2:], torch.full((2,), -1.0 / 6))  # policy gradient over the 6 continuation tokens
    assert_close(grad[1], torch.full((4,), -1.0 / 6))


def test_prefix_pg_without_prefixes_is_ppo_clip():
    batch = testing.fake_rollouts(lengths=[3, 2], advantages=[1.0, -0.5], old_logprobs=-1.0)
    logprobs = batch.old_logprobs + torch.tensor([[0.4, -0.1, 0.0], [0.2, -0.5, 0.0]])
    expected, _ = plugins.get("loss", "ppo_clip")(clip_high=0.28).compute(batch, logprobs)
    got, stats = prefix_loss(clip_high=0.28).compute(batch, logprobs)
    assert_close(got, expected)
    assert stats["prefix_nll"] == 0.0


def test_prefix_pg_options_are_checked():
    with pytest.raises(ValueError, match="sft_coef"):
        prefix_loss(sft_coef=-1.0)
    with pytest.raises(ValueError, match="sft_aggregation"):
        prefix_loss(sft_aggregation="constant")
    assert set(prefix_loss(kl_coef=0.1).requires) == {"advantages", "old_logprobs", "ref_logprobs"}


# -------------------------------------------------------------------------------------- sampler
DEMO = Prompt(text="1+2=", answer="3", solution="1+2 is 3")  # 8 characters: 8 tokens of the tiny tokenizer


def test_sampler_puts_the_demonstration_prefix_before_the_continuation(tiny_policy):
    tok = tiny_policy.tokenizer
    batch = prefix_sampler(prefix_ratio=0.5, max_new_tokens=3).sample(tiny_policy, [DEMO], group_size=2)
    assert len(batch) == 2 and batch.group_ids.tolist() == [0, 0]
    expected = tok("1+2 ", add_special_tokens=False)["input_ids"]
    for i in range(2):
        assert batch.info[i]["prefix_len"] == 4 and batch.info[i]["prefix_ratio"] == 0.5
        assert batch.completion_ids[i, :4].tolist() == expected
        assert batch.completions[i].startswith("1+2 ")
        assert batch.prompts[i] == "1+2="
    # the policy is trained on the original prompt; the loss mask covers the continuation only
    assert_close(batch.prompt_ids, encode_prompts(tok, ["1+2="])["input_ids"].repeat(2, 1))
    prefix, continuation = prefix_masks(batch)
    assert_close(prefix + continuation, batch.completion_mask.float())
    assert_close(continuation, batch.loss_mask.float())
    assert (batch.completion_mask.sum(1) > 4).all()  # at least one continuation token


def test_prefixed_per_group_mixes_guided_and_unguided_samples(tiny_policy):
    data = [DEMO, Prompt(text="5+5=", answer="10")]  # no solution: the answer is the demonstration
    batch = prefix_sampler(prefix_ratio=1.0, prefixed_per_group=1, max_new_tokens=2).sample(tiny_policy, data, 3)
    assert [info["prefix_len"] for info in batch.info] == [8, 0, 0, 2, 0, 0]
    batch = prefix_sampler(prefix_ratio=1.0, max_new_tokens=2).sample(
        tiny_policy, [Prompt(text="7=", answer=None)], 2)
    assert [info["prefix_len"] for info in batch.info] == [0, 0]  # nothing to imitate: plain sampling


def test_random_ratio_is_seeded_and_within_range(tiny_policy):
    def lens(seed):
        s = prefix_sampler(min_ratio=0.25, max_ratio=0.75, seed=seed, max_new_tokens=1)
        return [info["prefix_len"] for info in s.sample(tiny_policy, [DEMO] * 4, 2).info]

    first = lens(3)
    assert all(2 <= n <= 6 for n in first) and len(set(first)) > 1
    assert lens(3) == first
    s = prefix_sampler(min_ratio=0.25, max_ratio=0.75, seed=3, max_new_tokens=1)
    s.sample(tiny_policy, [DEMO], 2)
    other = prefix_sampler(min_ratio=0.25, max_ratio=0.75, seed=8)
    other.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert [other.draw_ratio() for _ in range(5)] == [s.draw_ratio() for _ in range(5)]


def test_chat_template_prompts_match_the_hf_sampler(tiny_policy):
    tok = copy.deepcopy(tiny_policy.tokenizer)
    tok.chat_template = "{{ bos_token }}{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A: "
    policy = Policy(tiny_policy.model, tok)
    batch = prefix_sampler(prefix_ratio=0.5, chat_template=True, max_new_tokens=2).sample(policy, [DEMO], 1)
    assert_close(batch.prompt_ids, encode_prompts(tok, ["1+2="], chat_template=True)["input_ids"])
    assert batch.completions[0].startswith("1+2 ") and batch.info[0]["prefix_len"] == 4


def test_chat_rendering_drops_a_bos_the_tokenizer_adds_again(tiny_policy):
    from tokenizers import processors

    from rlctl_plugins.prefix import render_prompt

    tok = copy.deepcopy(tiny_policy.tokenizer)
    tok.chat_template = "{{ bos_token }}Q: {{ messages[0]['content'] }}\nA: "
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # this tokenizer adds a BOS itself
    rendered = render_prompt(tok, "1+2=", chat_template=True)
    assert rendered == "Q: 1+2=\nA: "
    # tokenised with special tokens (as the continuation is generated) it equals the chat-encoded prompt
    assert tok(rendered)["input_ids"] == encode_prompts(tok, ["1+2="], chat_template=True)["input_ids"][0].tolist()
    assert render_prompt(tok, "1+2=", chat_template=False) == "1+2="


@pytest.mark.parametrize("options, message", [
    ({"prefix_ratio": 1.5}, "prefix_ratio"),
    ({"min_ratio": 0.2}, "give both"),
    ({"min_ratio": 0.8, "max_ratio": 0.2}, "min_ratio"),
    ({"prefixed_per_group": -1}, "prefixed_per_group"),
])
def test_bad_sampler_options(options, message):
    with pytest.raises(ValueError, match=message):
        prefix_sampler(**options)


# ---------------------------------------------------------------------------------------- a run


PREFIX_RECIPE = """
[sampler]
use = "prefix"
max_new_tokens = 4
min_ratio = 0.0
max_ratio = 1.0
"""


@pytest.mark.slow
def test_prefix_sampling_trains_end_to_end(tiny_model_dir, tmp_path):
    text = grpo_recipe(tiny_model_dir, steps=2).replace('[sampler]\nuse = "hf"\nmax_new_tokens = 4\n', PREFIX_RECIPE)
    text = text.replace('use = "ppo_clip"', 'use = "prefix_pg"\nsft_coef = 0.5')
    # arithmetic solutions are the answers themselves ("12"): the prefix is part of the answer
    recipe = load_recipe(write_recipe(tmp_path, text))
    summary = Trainer(recipe, output_dir=tmp_path / "run", show_progress=False).run()
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval" not in r]
    assert [r["step"] for r in steps] == [0, 1] and summary["steps"] == 2
    for r in steps:
        for key in ("loss", "pg_loss", "prefix_nll", "prefix_frac", "clip_frac", "reward"):
            assert math.isfinite(r[key]), key
        assert 0.0 < r["prefix_frac"] < 1.0


def test_prefix_sampler_rejects_bad_recipe_options(tiny_model_dir, tmp_path):
    text = grpo_recipe(tiny_model_dir).replace('[sampler]\nuse = "hf"\nmax_new_tokens = 4\n',
                                               '[sampler]\nuse = "prefix"\nmax_ratio = 0.5\n')
    with pytest.raises(RecipeError, match="give both"):
        load_recipe(write_recipe(tmp_path, text))
