"""Rewards in rlctl_plugins.verifiers: hand-computed scores (ALGORITHMS.md section 5)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch.testing import assert_close

from rlctl import plugins
from rlctl.rollouts import Rollouts


def make_rollouts(completions, infos=None, prompts=None, lengths=None) -> Rollouts:
    n = len(completions)
    lengths = lengths or [max(1, len(c)) for c in completions]
    width = max(lengths)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    return Rollouts(
        prompt_ids=torch.ones(n, 1, dtype=torch.long),
        prompt_mask=torch.ones(n, 1, dtype=torch.long),
        completion_ids=torch.ones(n, width, dtype=torch.long) * mask,
        completion_mask=mask,
        group_ids=torch.arange(n),
        prompts=prompts or [""] * n,
        completions=list(completions),
        info=infos or [{} for _ in range(n)],
    )


def reward(name, **options):
    return plugins.get("reward", name)(**options)


# ----------------------------------------------------------------------------------- math_verify
def test_math_verify_hand_checks():
    r = reward("math_verify")
    cases = [
        ("so the answer is \\boxed{1/2}", "0.5", 1.0),  # ALGORITHMS.md hand check
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("half: 0.5", "\\frac{1}{2}", 1.0),  # bare LaTeX reference
        ("3 + 4 = 7 #### 72", "72", 1.0),  # text after '####' wins over earlier numbers
        ("I had 3 apples, then 12", "12", 1.0),  # last number
        ("I had 3 apples, then 12", "3", 0.0),
        ("\\boxed{2} but maybe 3", "2", 1.0),  # boxed wins over the last number
        ("\\boxed{x^2 + 1}", "1 + x^2", 1.0),  # symbolic equality
        ("\\boxed{7}", "8", 0.0),
        ("no answer here", "8", 0.0),
        ("\\boxed{8}", None, 0.0),  # no reference
    ]
    rollouts = make_rollouts([c for c, _, _ in cases], [{"answer": g} for _, g, _ in cases])
    scores = r.score(rollouts)
    assert scores.dtype == torch.float32
    assert_close(scores, torch.tensor([s for _, _, s in cases]))


def test_math_verify_answer_key_and_validation():
    r = reward("math_verify", answer_key="target")
    assert r.score(make_rollouts(["\\boxed{4}"], [{"target": "4", "answer": "5"}])).tolist() == [1.0]
    with pytest.raises(ValueError, match="timeout = -1"):
        reward("math_verify", timeout=-1)


# ---------------------------------------------------------------------------------------- format
def test_format_default_pattern_missing_tag_scores_zero():
    r = reward("format")
    texts = ["<think>a\nb</think>\n<answer>4</answer>", "<think>a</think> 4",
             "  <think></think><answer>x</answer> "]
    assert_close(r.score(make_rollouts(texts)), torch.tensor([1.0, 0.0, 1.0]))


def test_format_fullmatch_vs_search():
    full = reward("format", pattern=r"\d+", mode="fullmatch")
    search = reward("format", pattern=r"\d+", mode="search")
    rollouts = make_rollouts(["42", "answer 42", "none"])
    assert_close(full.score(rollouts), torch.tensor([1.0, 0.0, 0.0]))
    assert_close(search.score(rollouts), torch.tensor([1.0, 1.0, 0.0]))
    no_dotall = reward("format", pattern="a.b", dotall=False)
    assert no_dotall.score(make_rollouts(["a\nb", "axb"])).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("options, message", [
    ({"pattern": "(unclosed"}, "pattern = "),
    ({"mode": "match"}, "mode = 'match'"),
])
def test_format_validation(options, message):
    with pytest.raises(ValueError, match=message):
        reward("format", **options)


# ---------------------------------------------------------------------------------------- length
def test_length_linear_ramp_in_tokens():
    r = reward("length", soft_limit=4, hard_limit=8)
    rollouts = make_rollouts(["x"] * 6, lengths=[2, 4, 5, 6, 8, 10])
    assert_close(r.score(rollouts), torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))


def test_length_in_chars_with_penalty_scale():
    r = reward("length", soft_limit=10, hard_limit=20, penalty=0.5, unit="chars")
    rollouts = make_rollouts(["a" * 5, "a" * 15, "a" * 30], lengths=[1, 1, 1])  # token counts ignored
    assert_close(r.score(rollouts), torch.tensor([0.0, -0.25, -0.5]))


@pytest.mark.parametrize("options, message", [
    ({"soft_limit": 8, "hard_limit": 8}, "hard_limit = 8"),
    ({"soft_limit": -1}, "soft_limit = -1"),
    ({"penalty": -1.0}, "penalty = -1.0"),
    ({"unit": "words"}, "unit = 'words'"),
])
def test_length_validation(options, message):
    with pytest.raises(ValueError, match=message):
        reward("length", **options)


# -------------------------------------------------------------------------------- noisy_verifier
def test_noisy_verifier_hand_check():
    r = reward("noisy_verifier", rho0=0.1, rho1=0.2)  # inner verifier: exact
    rollouts = make_rollouts(["#### 5", "#### 6"], [{"answer": "5"}, {"answer": "5"}])
    assert_close(r.score(rollouts), torch.tensor([0.9 / 0.7, -0.1 / 0.7]))
    assert_close(r.score(rollouts), torch.tensor([1.2857, -0.142857]), atol=1e-4, rtol=0)


def test_noisy_verifier_is_unbiased():
    rho0, rho1 = 0.1, 0.2
    r = reward("noisy_verifier", rho0=rho0, rho1=rho1)
    one, zero = r.correct(torch.tensor([1.0, 0.0])).tolist()
    # correct answer: the verifier says 1 w.p. 1 - rho1; wrong answer: says 1 w.p. rho0
    assert (1 - rho1) * one + rho1 * zero == pytest.approx(1.0, abs=1e-6)
    assert rho0 * one + (1 - rho0) * zero == pytest.approx(0.0, abs=1e-6)


def test_noisy_verifier_wraps_any_reward_with_options():
    r = reward("noisy_verifier", verifier="format", verifier_options={"pattern": "ok"}, rho0=0.0, rho1=0.5)
    assert_close(r.score(make_rollouts(["ok", "no"])), torch.tensor([2.0, 0.0]))


@pytest.mark.parametrize("options, message", [
    ({"rho0": 0.6, "rho1": 0.4}, "rho0 \\+ rho1 = 1.0"),
    ({"rho0": -0.1}, "rho0 = -0.1"),
    ({"rho1": 1.0}, "rho1 = 1.0"),
    ({"verifier": "no_such_reward"}, "verifier = 'no_such_reward'"),
    ({"verifier": "noisy_verifier"}, "verifier = 'noisy_verifier'"),
    ({"verifier_options": {"no_such_option": 1}}, "not accepted by reward 'exact'"),
])
def test_noisy_verifier_validation(options, message):
    with pytest.raises(ValueError, match=message):
        reward("noisy_verifier", **options)


# -------------------------------------------------------------------------------------- callable
@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def by_length(completions, infos, scale=1.0):
            return [scale * len(c) for c in completions]

        def matches_answer(completions, infos):
            return [float(c == i["answer"]) for c, i in zip(completions, infos)]

        def wrong_count(completions, infos):
            return [0.0]

        not_callable = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_callable_reward(user_module):
    rollouts = make_rollouts(["ab", "abcd"], [{"answer": "ab"}, {"answer": "x"}])
    by_length = reward("callable", function=f"{user_module}:by_length")
    assert_close(by_length.score(rollouts), torch.tensor([2.0, 4.0]))
    scaled = reward("callable", function=f"{user_module}:by_length", options={"scale": 0.5})
    assert_close(scaled.score(rollouts), torch.tensor([1.0, 2.0]))
    assert reward("callable", function=f"{user_module}:matches_answer").score(rollouts).tolist() == [1.0, 0.0]


def test_callable_wrong_number_of_scores(user_module):
    r = reward("callable", function=f"{user_module}:wrong_count")
    with pytest.raises(ValueError, match="returned 1 scores for 2 completions"):
        r.score(make_rollouts(["a", "b"]))


@pytest.mark.parametrize("function, message", [
    ("", "function = ''"),
    ("no_colon", "package.module:function"),
    ("surely_not_a_module_xyz:f", "cannot import module 'surely_not_a_module_xyz'"),
    ("my_rewards:missing", "has no attribute 'missing'"),
    ("my_rewards:not_callable", "is not callable"),
])
def test_callable_import_errors(user_module, function, message):
    with pytest.raises(ValueError, match=message):
        reward("callable", function=function)


# ---------------------------------------------------------------------------------- reward_model
def _save_classifier(model, path):
    from rlctl.models import build_tokenizer

    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def constant_bert(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    from rlctl.models import build_tokenizer

    tok = build_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128, num_labels=1,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(0.7)
    return _save_classifier(model, tmp_path_factory.mktemp("constant_rm"))


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlctl.models import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         num_labels=2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return _save_classifier(LlamaForSequenceClassification(config), tmp_path_factory.mktemp("random_rm"))


def test_reward_model_constant_model_gives_constant_reward(constant_bert):
    r = reward("reward_model", path=constant_bert, batch_size=2)
    assert r.model is None  # building the component (recipe validation) does not load the model
    rollouts = make_rollouts(["a", "a much longer completion", "42"], prompts=["Q: ", "Q: ", "other prompt "])
    scores = r.score(rollouts)
    assert scores.dtype == torch.float32
    assert_close(scores, torch.full((3,), 0.7))


def test_reward_model_scores_prompt_plus_completion_independent_of_batching(random_llama):
    prompts = ["What is 2+2? ", "Name a colour. ", "What is 2+2? "]
    completions = ["4", "blue, or perhaps a long list of colours", "5"]
    rollouts = make_rollouts(completions, prompts=prompts)
    batched = reward("reward_model", path=random_llama, batch_size=3, label=1).score(rollouts)
    single = reward("reward_model", path=random_llama, batch_size=1, label=1).score(rollouts)
    assert_close(batched, single, atol=1e-5, rtol=1e-5)  # right padding does not change the score
    assert len(set(batched.tolist())) == 3

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(random_llama)
    model = AutoModelForSequenceClassification.from_pretrained(random_llama).eval()
    with torch.no_grad():
        direct = model(**tok(prompts[1] + completions[1], return_tensors="pt",
                             return_token_type_ids=False)).logits[0, 1]
    assert_close(batched[1], direct)


def test_reward_model_validation(random_llama, tmp_path):
    with pytest.raises(ValueError, match="path = ''"):
        reward("reward_model", path="")
    with pytest.raises(ValueError, match="no such directory"):
        reward("reward_model", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a model directory"):
        reward("reward_model", path=str(tmp_path))
    with pytest.raises(ValueError, match="label = -1"):
        reward("reward_model", path=random_llama, label=-1)
    with pytest.raises(ValueError, match="label = 2"):
        reward("reward_model", path=random_llama, label=2)
    with pytest.raises(ValueError, match="dtype = 'int8'"):
        reward("reward_model", path=random_llama, dtype="int8")
