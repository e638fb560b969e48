"""Nested-ReFT: the layer-skipping ``nested`` sampler, the ``nested_skip`` scheduler and the ``nested_is``
off-policy loss (docs/nested_reft.md).

(a) no block skipped: behaviour log-probs are the policy's and ``nested_is`` is ``ppo_clip``;
(b) cached decoding with skipped blocks equals a model physically built without them (Llama, Qwen2,
    GPT-2); (c) unbiasedness of token / sequence IS by exact enumeration; (d) the seeded per-batch draw;
(e) hand numbers for every correction mode; (f) a short end-to-end run of recipes/nested_reft.toml.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from rlctl import plugins
from rlctl.generation import completion_mask, encode_prompts, eos_token_ids
from rlctl.models import Policy, build_tiny_model, load_policy, score_completions
from rlctl.recipe import ModelConfig, load_recipe, parse_recipe
from rlctl.errors import RecipeError
from rlctl.rollouts import Prompt, Rollouts
from rlctl.state import TrainState
from rlctl_plugins.nested import (NestedSampler, NestedSkipSchedule, SkippedBlock, draw_skip_set, find_blocks,
                                  num_skipped, skipped_blocks)
from rlctl_plugins.offpolicy import NestedISLoss, effective_sample_size, importance_weights

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [Prompt("12+7=", answer="19"), Prompt("3+4=", answer="7"), Prompt("40+9=", answer="49")]



def tiny_dir(arch: str, tmp_path_factory, layers: int = 4) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}") / "m", arch=arch, hidden_size=32,
                            num_layers=layers, num_heads=2)


@pytest.fixture(scope="module")
def policy4(tmp_path_factory) -> Policy:
    """A tiny 4-block Llama and its tokenizer."""
    model, tok = load_policy(ModelConfig(name=str(tiny_dir("llama", tmp_path_factory))))
    return Policy(model, tok)


def gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # GPT2Config's default bos/eos ids lie outside this small vocabulary
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=60, n_positions=64,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0))


# ----------------------------------------------------------------------------- (b) the KV cache
def physically_smaller(model, kept: list[int]):
    """A fresh model built with only the ``kept`` blocks (config.num_hidden_layers = len(kept), so its
    attention layers are numbered 0..K-1 by their constructors), with the corresponding weights."""
    path, _ = find_blocks(model)
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(kept)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    small = type(model)(cfg)
    prefix, state = path + ".", {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) in kept:
                state[f"{prefix}{kept.index(int(index))}.{rest}"] = value
        else:
            state[key] = value
    small.load_state_dict(state, strict=True)
    assert len(find_blocks(small)[1]) == len(kept)
    return small.eval()


def greedy_with_cache(model, ids, mask, steps: int):
    """Greedy decoding one token at a time through a DynamicCache: (tokens [B, steps], logits [B, steps, V])."""
    from transformers import DynamicCache

    from rlctl.generation import with_cache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                **with_cache(model, cache))
    tokens, logits = [], []
    for _ in range(steps):
        last = out.logits[:, -1]
        nxt = last.argmax(-1, keepdim=True)
        tokens.append(nxt)
        logits.append(last)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(input_ids=nxt, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                    **with_cache(model, cache))
    return torch.cat(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_cached_decoding_matches_a_physically_smaller_model(arch, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model = gpt2_model() if arch == "gpt2" else AutoModelForCausalLM.from_pretrained(tiny_dir(arch, tmp_path_factory))
    model.eval()
    originals = list(find_blocks(model)[1])
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # the first prompt is left-padded
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for skip in ([0], [1, 2], [0, 2], [3], [0, 1, 2]):  # first block, middle, mixed, last, all but one
        kept = [i for i in range(4) if i not in skip]
        small = physically_smaller(model, kept)
        with torch.no_grad():
            want_tokens, want_logits = greedy_with_cache(small, ids, mask, 8)
            with skipped_blocks(model, skip) as kept_inside:
                assert kept_inside == kept
                assert all(isinstance(find_blocks(model)[1][i], SkippedBlock) for i in skip)
                tokens, logits = greedy_with_cache(model, ids, mask, 8)
                # transformers' own generate loop with its cache, too
                gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                                     min_new_tokens=6, output_logits=True, return_dict_in_generate=True,
                                     pad_token_id=0)
                # no cache: teacher-forced over the decoded sequence
                full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)
                forced = model(input_ids=torch.cat([ids, tokens], 1), attention_mask=full_mask,
                               position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0), use_cache=False).logits
            want_gen = small.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                                      min_new_tokens=6, output_logits=True, return_dict_in_generate=True,
                                      pad_token_id=0)
        assert torch.equal(tokens, want_tokens), (arch, skip)
        assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(gen.sequences, want_gen.sequences), (arch, skip)
        assert_close(torch.stack(gen.logits, 1), torch.stack(want_gen.logits, 1), atol=1e-5, rtol=1e-5)
        assert_close(forced[:, ids.shape[1] - 1:-1], logits, atol=1e-4, rtol=1e-4)
    assert list(find_blocks(model)[1]) == originals  # every block is back in place


def test_without_renumbering_the_cache_breaks_when_block_0_is_skipped(tmp_path_factory):
    """Why the kept blocks get cache slots 0..K-1: the cache's length, and with it the attention mask of
    the decoding steps, is read from slot 0, which stays empty when block 0 is skipped."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama", tmp_path_factory)).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # left padding: the mask needs the cache length
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    small = physically_smaller(model, [1, 2, 3])
    with torch.no_grad():
        _, want = greedy_with_cache(small, ids, mask, 4)
        with skipped_blocks(model, [0], renumber=False):
            _, broken = greedy_with_cache(model, ids, mask, 4)
    assert (broken[:, 1:] - want[:, 1:]).abs().max() > 1e-3  # the prefill step is right, later ones are not


def test_blocks_and_cache_slots_are_restored_on_an_exception(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen2", tmp_path_factory))
    blocks = find_blocks(model)[1]
    before = list(blocks)
    with pytest.raises(RuntimeError, match="boom"):
        with skipped_blocks(model, [0, 2]):
            assert blocks[1].self_attn.layer_idx == 0 and blocks[3].self_attn.layer_idx == 1
            raise RuntimeError("boom")
    assert list(blocks) == before
    assert [b.self_attn.layer_idx for b in blocks] == [0, 1, 2, 3]


def test_unsupported_models_fail_clearly():
    class NotALanguageModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.b = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(ValueError, match="cannot find the transformer blocks of NotALanguageModel"):
        find_blocks(NotALanguageModel())
    with pytest.raises(ValueError, match="out of range"):
        with skipped_blocks(gpt2_model(), [4]):
            pass
    with pytest.raises(ValueError, match="cannot skip all 4 blocks"):
        with skipped_blocks(gpt2_model(), [0, 1, 2, 3]):
            pass


# --------------------------------------------------------------- behaviour log-probs and (a)
def test_behavior_logprobs_are_the_sampling_distribution(policy4):
    """log mu(y_t) recorded by the sampler equals generate's own processed scores (temperature, top-k,
    top-p, min_new_tokens) of the skipped model."""
    model, tok = policy4.model, policy4.tokenizer
    for options in ({}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_new_tokens": 3}):
        sampler = NestedSampler(skip_layers=[1, 2], max_new_tokens=6, **options)
        enc = encode_prompts(tok, [p.text for p in PROMPTS])
        torch.manual_seed(0)
        with skipped_blocks(model, [1, 2]), torch.no_grad():
            model.eval()
            out = model.generate(**enc, do_sample=True, max_new_tokens=6, min_new_tokens=sampler.min_new_tokens,
                                 temperature=sampler.temperature, top_k=sampler.top_k, top_p=sampler.top_p,
                                 output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
            ids = out.sequences[:, enc["input_ids"].shape[1]:]
            mask = completion_mask(ids, eos_token_ids(model, tok))
            batch = Rollouts(prompt_ids=enc["input_ids"], prompt_mask=enc["attention_mask"], completion_ids=ids,
                             completion_mask=mask, group_ids=torch.arange(len(PROMPTS)),
                             temperature=sampler.temperature)
            got = sampler.behavior_logprobs(model, batch, eos_token_ids(model, tok), rows=2)
        model.train()
        want = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, ids[:, t:t + 1]).squeeze(-1)
                            for t, s in enumerate(out.scores)], 1)
        assert_close(got * mask, want * mask, atol=1e-5, rtol=1e-5)


def test_sampler_equals_sampling_from_a_physically_smaller_model(policy4):
    """The whole sampler (rlctl's decoding loop, group KV-cache sharing, behaviour scoring) with blocks 0
    and 2 skipped draws the same completions, with the same log-probs, as the 2-block model."""
    from rlctl.generation import generate

    small = Policy(physically_smaller(policy4.model, [1, 3]), policy4.tokenizer)
    sampler = NestedSampler(skip_layers=[0, 2], keep_first=0, max_new_tokens=6, temperature=0.8)
    torch.manual_seed(3)
    got = sampler.sample(policy4, PROMPTS, group_size=3)
    torch.manual_seed(3)
    want = generate(small, PROMPTS, 3, max_new_tokens=6, temperature=0.8)
    assert torch.equal(got.completion_ids, want.completion_ids)
    with torch.no_grad():
        want_logprobs = score_completions(small.model, want).logprobs
    m = want.completion_mask
    assert_close(got.behavior_logprobs * m, want_logprobs * m, atol=1e-5, rtol=1e-5)


def test_mu_recorded_while_decoding_equals_mu_scored_afterwards(policy4):
    """With blocks skipped the sampler takes log mu(y_t) from the decoding step that drew y_t (no second
    pass); it equals the scoring pass over the finished completions, processors included."""
    for options in ({"temperature": 0.8}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_new_tokens": 3}):
        sampler = NestedSampler(skip_layers=[1, 2], max_new_tokens=6, **options)
        torch.manual_seed(5)
        got = sampler.sample(policy4, PROMPTS, group_size=3)
        with skipped_blocks(policy4.model, [1, 2]):
            scored = sampler.behavior_logprobs(policy4.model, got, eos_token_ids(policy4.model, policy4.tokenizer))
        m = got.completion_mask
        assert m.sum() > 0 and sampler.last_timing["score_s"] < sampler.last_timing["generate_s"]
        assert_close(got.behavior_logprobs * m, scored * m, atol=1e-5, rtol=1e-5)


def test_warns_when_model_generate_would_apply_processors_mu_ignores(policy4, monkeypatch, recwarn):
    monkeypatch.setattr(policy4.model.generation_config, "repetition_penalty", 1.1)
    monkeypatch.delenv("RLCTL_GENERATE", raising=False)
    NestedSampler()._check_generation_config(policy4.model)  # rlctl's decoder ignores the penalty
    assert not [w for w in recwarn if "nested sampler" in str(w.message)]
    monkeypatch.setenv("RLCTL_GENERATE", "hf")
    with pytest.warns(UserWarning, match="repetition_penalty"):
        NestedSampler()._check_generation_config(policy4.model)


def test_empty_skip_set_is_on_policy_and_nested_is_equals_ppo_clip(policy4):
    sampler = NestedSampler(skip_ratio=0.0, max_new_tokens=5, temperature=0.9)
    torch.manual_seed(1)
    batch = sampler.sample(policy4, PROMPTS, group_size=2)
    assert all(info["skipped_layers"] == [] for info in batch.info)
    assert policy4.model.training  # the sampler leaves the mode as it found it
    out = score_completions(policy4.model, batch)
    m = batch.completion_mask
    assert_close(batch.behavior_logprobs * m, out.logprobs.detach() * m, atol=1e-5, rtol=1e-5)
    batch.old_logprobs = out.logprobs.detach()
    batch.advantages = torch.randn(len(batch), 1).expand_as(m) * m
    ppo = plugins.get("loss", "ppo_clip")(clip_low=0.2, clip_high=0.28)
    want_loss, _ = ppo.compute(batch, out.logprobs)
    want_grad = torch.autograd.grad(want_loss, out.logprobs, retain_graph=True)[0]
    for correction in ("none", "token", "sequence", "truncated", "retrace"):
        loss_fn = plugins.get("loss", "nested_is")(correction=correction, clip_low=0.2, clip_high=0.28)
        loss, stats = loss_fn.compute(batch, out.logprobs)
        grad = torch.autograd.grad(loss, out.logprobs, retain_graph=True)[0]
        assert_close(loss, want_loss, atol=1e-6, rtol=1e-5)
        assert_close(grad, want_grad, atol=1e-6, rtol=1e-5)
        assert stats["is_ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert stats["ess"] == pytest.approx(1.0, abs=1e-5)
        assert stats["skipped_layers"] == 0


def test_skipping_changes_the_behaviour_and_truncated_matches_ppo_clip_tis(policy4):
    sampler = NestedSampler(skip_layers=[1, 2], max_new_tokens=5)
    torch.manual_seed(2)
    batch = sampler.sample(policy4, PROMPTS, group_size=2)
    assert all(info["skipped_layers"] == [1, 2] for info in batch.info)
    assert type(find_blocks(policy4.model)[1][1]).__name__ == "LlamaDecoderLayer"
    out = score_completions(policy4.model, batch)
    m = batch.completion_mask.bool()
    assert (batch.behavior_logprobs - out.logprobs.detach())[m].abs().max() > 1e-3  # mu != pi
    batch.old_logprobs = out.logprobs.detach()
    batch.advantages = torch.linspace(-1, 1, len(batch)).unsqueeze(-1) * batch.completion_mask
    loss, stats = NestedISLoss(correction="truncated", cap=1.5).compute(batch, out.logprobs)
    want, _ = plugins.get("loss", "ppo_clip")(tis_cap=1.5).compute(batch, out.logprobs)
    assert_close(loss, want)
    assert stats["is_ratio_max"] > 0 and 0 < stats["ess"] <= 1


# ------------------------------------------------------------------------- (c) unbiasedness
def _per_sample_loss(loss_fn, logprobs, behavior, advantage):
    """The loss of one completion with log-probs ``logprobs`` [T] (with gradient) under the policy."""
    t = logprobs.shape[0]
    batch = Rollouts(prompt_ids=torch.ones(1, 1, dtype=torch.long), prompt_mask=torch.ones(1, 1, dtype=torch.long),
                     completion_ids=torch.ones(1, t, dtype=torch.long), completion_mask=torch.ones(1, t, dtype=torch.long),
                     group_ids=torch.zeros(1, dtype=torch.long), old_logprobs=logprobs.detach().unsqueeze(0),
                     behavior_logprobs=behavior.unsqueeze(0), advantages=torch.full((1, t), float(advantage)))
    return loss_fn.compute(batch, logprobs.unsqueeze(0))[0]


def _expected_estimate(loss_fn, theta, outcomes):
    """E_mu[-grad loss] by enumeration: sum over outcomes of mu(y) * (-grad_theta loss(y))."""
    total = torch.zeros_like(theta)
    for logprobs_fn, behavior, reward in outcomes:
        lp = logprobs_fn(theta)
        (g,) = torch.autograd.grad(_per_sample_loss(loss_fn, lp, behavior, reward), theta)
        total -= behavior.sum().exp() * g
    return total


def test_single_step_token_and_sequence_is_are_unbiased_truncated_is_not():
    theta = torch.tensor([0.5, -1.0, 1.5, 0.0], requires_grad=True)
    mu = torch.tensor([0.4, 0.3, 0.1, 0.2])
    reward = torch.tensor([1.0, 0.0, 2.0, -1.0])
    (exact,) = torch.autograd.grad((torch.softmax(theta, 0) * reward).sum(), theta)  # grad E_pi[R]
    outcomes = [(lambda th, y=y: torch.log_softmax(th, 0)[y:y + 1], mu[y:y + 1].log(), reward[y]) for y in range(4)]
    for correction in ("token", "sequence"):
        got = _expected_estimate(NestedISLoss(correction=correction), theta, outcomes)
        assert_close(got, exact, atol=1e-6, rtol=1e-5)
    # pi(2) / mu(2) = 3.6: a cap of 1.5 (and ignoring mu) biases the estimate
    pi = torch.softmax(theta, 0).detach()
    assert (pi / mu).max() > 3
    for loss_fn in (NestedISLoss(correction="truncated", cap=1.5), NestedISLoss(correction="none")):
        got = _expected_estimate(loss_fn, theta, outcomes)
        assert (got - exact).abs().max() > 0.05


def test_two_step_sequence_is_is_unbiased_token_is_is_not():
    """Completions of 2 tokens from a vocabulary of 3 (9 sequences), outcome reward R(y1, y2)."""
    torch.manual_seed(0)
    theta = torch.randn(1 + 3, 3, requires_grad=True)  # row 0: first token; row 1 + y1: second token
    mu1 = torch.tensor([0.5, 0.3, 0.2])
    mu2 = torch.tensor([[0.2, 0.2, 0.6], [0.3, 0.4, 0.3], [0.7, 0.2, 0.1]])
    reward = torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 0.0], [1.0, -1.0, 0.0]])

    def pi_logprobs(th, y1, y2):
        return torch.stack([torch.log_softmax(th[0], 0)[y1], torch.log_softmax(th[1 + y1], 0)[y2]])

    pi1 = torch.softmax(theta[0], 0)
    pi2 = torch.softmax(theta[1:], 1)
    (exact,) = torch.autograd.grad((pi1.unsqueeze(1) * pi2 * reward).sum(), theta)
    outcomes = [(lambda th, a=a, b=b: pi_logprobs(th, a, b), torch.stack([mu1[a], mu2[a, b]]).log(), reward[a, b])
                for a in range(3) for b in range(3)]
    # token sums: the sequence's log-likelihood gradient, weighted once per sequence
    sequence = _expected_estimate(NestedISLoss(correction="sequence", aggregation="seq-mean-token-sum"), theta,
                                  outcomes)
    assert_close(sequence, exact, atol=1e-6, rtol=1e-5)
    token = _expected_estimate(NestedISLoss(correction="token", aggregation="seq-mean-token-sum"), theta, outcomes)
    assert (token - exact).abs().max() > 0.01  # the per-token ratio leaves the prefix / suffix under mu


# ------------------------------------------------------------------------------- (d) the draw
def test_skip_count_rounds_half_up_and_respects_keep_first_and_last():
    assert num_skipped(0.25, 4, 1, 1) == 1
    assert num_skipped(0.125, 4, 1, 1) == 1  # 0.5 rounds up
    assert num_skipped(0.1, 4, 1, 1) == 0  # 0.4 rounds down
    assert num_skipped(0.3, 8, 0, 0) == 2 and num_skipped(0.32, 8, 0, 0) == 3  # 2.4 -> 2, 2.56 -> 3
    assert num_skipped(0.75, 4, 1, 1) == 2  # only blocks 1 and 2 are eligible
    assert num_skipped(0.5, 4, 2, 2) == 0
    for draw in range(20):
        s = draw_skip_set(10, 0.5, keep_first=2, keep_last=3, seed=7, draw=draw)
        assert s == [2, 3, 4, 5, 6]  # 5 of the 5 eligible blocks
        s = draw_skip_set(24, 0.25, keep_first=2, keep_last=3, seed=7, draw=draw)
        assert len(s) == 6 and min(s) >= 2 and max(s) <= 20 and s == sorted(set(s))


def test_the_per_batch_draw_is_seeded():
    def draws(seed, n=12):
        return [draw_skip_set(24, 0.25, 1, 1, seed, i) for i in range(n)]

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)
    assert len({tuple(s) for s in draws(0)}) > 6  # re-drawn per batch
    sampler = NestedSampler(skip_ratio=0.25, seed=3)
    first = [sampler.skip_set(24) for _ in range(3)]
    assert first == [draw_skip_set(24, 0.25, 1, 1, 3, i) for i in range(3)]
    resumed = NestedSampler(skip_ratio=0.25, seed=3)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.skip_set(24) == sampler.skip_set(24)  # a resumed run draws the same next set


def test_sampler_records_the_seeded_skip_set(policy4):
    a = NestedSampler(skip_ratio=0.5, keep_first=1, keep_last=1, seed=5, max_new_tokens=3)
    b = NestedSampler(skip_ratio=0.5, keep_first=1, keep_last=1, seed=5, max_new_tokens=3)
    for draw in range(2):
        ra, rb = a.sample(policy4, PROMPTS[:1], 2), b.sample(policy4, PROMPTS[:1], 2)
        assert ra.info[0]["skipped_layers"] == rb.info[1]["skipped_layers"] == draw_skip_set(4, 0.5, 1, 1, 5, draw)
        assert ra.info[0]["skipped_layers"] == [1, 2]  # 0.5 * 4 = 2: both eligible blocks
        assert ra.behavior_logprobs.shape == ra.completion_ids.shape and "truncated" in ra.info[0]


def test_sampler_options_are_checked():
    with pytest.raises(ValueError, match="not both"):
        NestedSampler(skip_ratio=0.2, skip_layers=[1])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        NestedSampler(skip_ratio=1.0)
    with pytest.raises(ValueError, match="keep_first"):
        NestedSampler(skip_layers=[0])
    with pytest.raises(ValueError, match="last keep_last"):
        NestedSampler(skip_layers=[3]).skip_set(4)
    assert NestedSampler().skip_ratio == 0.25 and NestedSampler(skip_layers=[0], keep_first=0).skip_set(4) == [0]
    with pytest.raises(ValueError, match="fixed blocks"):
        NestedSampler(skip_layers=[1]).skip_ratio = 0.5


def test_nested_skip_schedule_moves_the_ratio_linearly():
    sampler = NestedSampler(skip_ratio=0.1)
    schedule = plugins.get("scheduler", "nested_skip")(start=0.5, end=0.0, lr_schedule="linear")
    state = TrainState(stage_steps=5, base_lr=1.0, components={"sampler": sampler})
    ratios, lrs = [], []
    for step in range(5):
        state.stage_step = step
        schedule.step(state)
        ratios.append(sampler.skip_ratio)
        lrs.append(state.lr)
    assert ratios == pytest.approx([0.5, 0.375, 0.25, 0.125, 0.0])
    assert lrs == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])  # the linear learning-rate schedule
    state.components = {"sampler": plugins.get("sampler", "hf")()}
    with pytest.raises(ValueError, match="needs the stage's sampler to be 'nested'"):
        NestedSkipSchedule().step(state)


# ------------------------------------------------------------------------------ (e) hand numbers
def hand_batch(log_rho, advantage=1.0) -> Rollouts:
    log_rho = torch.tensor(log_rho, dtype=torch.float32)
    n, t = log_rho.shape
    old = torch.full((n, t), -1.0)
    return Rollouts(prompt_ids=torch.ones(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
                    completion_ids=torch.ones(n, t, dtype=torch.long), completion_mask=torch.ones(n, t, dtype=torch.long),
                    group_ids=torch.arange(n), old_logprobs=old, behavior_logprobs=old - log_rho,
                    advantages=torch.full((n, t), advantage))


LN2, LN4 = math.log(2.0), math.log(4.0)


@pytest.mark.parametrize("correction, options, weights", [
    ("none", {}, [1.0, 1.0, 1.0]),
    ("token", {}, [2.0, 1.0, 0.25]),
    ("sequence", {}, [0.5, 0.5, 0.5]),  # 2 * 1 * 0.25
    ("truncated", {"cap": 1.5}, [1.5, 1.0, 0.25]),
    ("retrace", {"lam": 0.9}, [0.9, 0.81, 0.18225]),  # c = 0.9 * min(1, rho) = 0.9, 0.9, 0.225; products
    ("retrace", {"lam": 1.0}, [1.0, 1.0, 0.25]),
])
def test_hand_numbers(correction, options, weights):
    batch = hand_batch([[LN2, 0.0, -LN4]], advantage=2.0)  # rho = 2, 1, 1/4
    lp = batch.old_logprobs.clone().requires_grad_(True)  # r = 1: the clip does not bind
    loss, stats = NestedISLoss(correction=correction, **options).compute(batch, lp)
    w = torch.tensor(weights)
    assert_close(loss, -(w * 2.0).mean())  # token-mean of -w_t * r_t * A_t
    (grad,) = torch.autograd.grad(loss, lp)
    assert_close(grad, -(w * 2.0 / 3).unsqueeze(0))  # d/dlogpi of -w r A / 3, r = exp(logpi - old)
    assert stats["is_ratio_mean"] == pytest.approx((2 + 1 + 0.25) / 3)
    assert stats["is_ratio_max"] == pytest.approx(2.0)
    assert stats["is_weight_mean"] == pytest.approx(sum(weights) / 3)
    ess = 1.0 if correction == "sequence" else sum(weights) ** 2 / (3 * sum(x * x for x in weights))
    assert stats["ess"] == pytest.approx(ess)


def test_hand_numbers_with_padding_clipping_and_sequences():
    batch = hand_batch([[LN2, LN2, 0.0], [-LN2, 0.0, 0.0]], advantage=1.0)
    batch.completion_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w = importance_weights(batch.old_logprobs - batch.behavior_logprobs, batch.completion_mask, "sequence")
    assert_close(w, torch.tensor([[4.0, 4.0, 0.0], [0.5, 0.5, 0.5]]))  # padding neither counts nor weighs
    w = importance_weights(batch.old_logprobs - batch.behavior_logprobs, batch.completion_mask, "retrace", lam=0.5)
    assert_close(w, torch.tensor([[0.5, 0.25, 0.0], [0.25, 0.125, 0.0625]]))
    assert effective_sample_size(torch.tensor([4.0, 0.5])) == pytest.approx(4.5**2 / (2 * 16.25))
    # r = 1.5 with A > 0: clipped at 1.2 (clip = true), not clipped with clip = false; token weights 2, 2 | .5, 1, 1
    lp = (batch.old_logprobs + math.log(1.5)).requires_grad_(True)
    clipped, stats = NestedISLoss(correction="token").compute(batch, lp)
    assert_close(clipped, -torch.tensor(1.2 * (2 + 2 + 0.5 + 1 + 1) / 5))
    assert stats["clip_frac"] == 1.0
    unclipped, _ = NestedISLoss(correction="token", clip=False).compute(batch, lp)
    assert_close(unclipped, -torch.tensor(1.5 * (2 + 2 + 0.5 + 1 + 1) / 5))


def test_loss_requirements_and_options():
    assert set(NestedISLoss().requires) == {"behavior_logprobs", "advantages", "old_logprobs"}
    assert "ref_logprobs" in NestedISLoss(kl_coef=0.1).requires
    with pytest.raises(ValueError, match="correction"):
        NestedISLoss(correction="vtrace")
    with pytest.raises(ValueError, match="lam"):
        NestedISLoss(lam=0.0)


def test_a_sampler_without_behaviour_logprobs_is_rejected_before_the_run():
    doc = load_recipe(ROOT / "recipes" / "nested_reft.toml").raw
    doc["sampler"] = {"use": "hf", "max_new_tokens": 4}
    doc["scheduler"] = {"use": "constant"}
    with pytest.raises(RecipeError, match="behaviour log-probs"):
        parse_recipe(doc, source="nested_reft.toml")


# ------------------------------------------------------------------------------ (f) end to end
@pytest.mark.slow
def test_nested_reft_recipe_trains_end_to_end(tmp_path):
    from rlctl.metrics import read_metrics
    from rlctl.trainer import Trainer

    recipe = load_recipe(ROOT / "recipes" / "nested_reft.toml", [
        "model.tiny.hidden_size=32", "data.num_eval=4", "eval.num_prompts=4", "eval.every=0",
        "stage.0.steps=1", "stage.0.train.prompts_per_step=4", "stage.1.steps=2", "train.prompts_per_step=2",
        "train.group_size=4"])
    trainer = Trainer(recipe, output_dir=tmp_path / "run", show_progress=False)
    trainer.run()
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval" not in r]
    assert [r["stage"] for r in rows] == ["warmup", "nested", "nested"]
    for r in rows[1:]:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert r["is_ratio_mean"] > 0 and r["is_ratio_max"] >= r["is_ratio_mean"] and 0 < r["ess"] <= 1
    # the schedule: start = 0.25 -> 1 block of 4 skipped, end = 0 -> none
    assert [r["skipped_layers"] for r in rows[1:]] == [1.0, 0.0]
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in find_blocks(trainer.policy_model)[1])
