"""Models, generation and the Rollouts data model."""

from __future__ import annotations

import math

import pytest
import torch

from rlctl.errors import RecipeError
from rlctl.generation import completion_mask, generate
from rlctl.models import TINY_MARKER, build_tiny_model, build_tokenizer, score_completions, selective_logprobs
from rlctl.rollouts import Prompt, Rollouts


def test_tokenizer_round_trips_text():
    tok = build_tokenizer()
    text = "12+7=19 The answer is \\boxed{1/2}."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_tiny_model_is_built_once_and_loads(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    assert (tiny_model_dir / "model.safetensors").exists()
    assert (tiny_model_dir / TINY_MARKER).exists()
    stamp = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    again = build_tiny_model(tiny_model_dir, arch="llama", hidden_size=32, num_layers=2, num_heads=2)
    assert again == tiny_model_dir and (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32


def test_tiny_model_never_overwrites_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "weights.bin").write_text("precious")
    with pytest.raises(RecipeError, match="refusing to overwrite"):
        build_tiny_model(tmp_path / "mine", hidden_size=16, num_layers=1, num_heads=2)
    assert (tmp_path / "mine" / "weights.bin").read_text() == "precious"


def test_qwen2_tiny_model(tmp_path):
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path / "q", arch="qwen2", hidden_size=16, num_layers=1, num_heads=2)
    assert AutoModelForCausalLM.from_pretrained(path).config.model_type == "qwen2"


def test_selective_logprobs_and_entropy():
    logits = torch.randn(3, 5, 11)
    targets = torch.randint(0, 11, (3, 5))
    logp, ent = selective_logprobs(logits, targets, temperature=0.7, with_entropy=True)
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp, ref)
    _, uniform = selective_logprobs(torch.zeros(1, 1, 11), torch.zeros(1, 1, dtype=torch.long), with_entropy=True)
    assert uniform.item() == pytest.approx(math.log(11), abs=1e-5)  # uniform over V -> log V


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_logprobs_gradient_matches_log_softmax(monkeypatch, temperature, dtype):
    """The block-wise backward equals autograd through a whole-batch log_softmax, also across blocks."""
    import rlctl.models.logprobs as models

    monkeypatch.setattr(models, "_BLOCK_ELEMENTS", 2 * 5 * 11)  # two rows per block: 3 rows span 2 blocks
    logits = torch.randn(3, 5, 11).to(dtype)
    targets = torch.randint(0, 11, (3, 5))
    w_logp, w_ent = torch.randn(3, 5), torch.randn(3, 5)

    mine = logits.clone().requires_grad_(True)
    logp, ent = selective_logprobs(mine, targets, temperature=temperature, with_entropy=True)
    ((logp * w_logp).sum() + (ent * w_ent).sum()).backward()

    ref = logits.clone().requires_grad_(True)
    logsm = torch.log_softmax(ref.float() / temperature, -1)
    ref_logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref_ent = -(logsm.exp() * logsm).sum(-1)
    ((ref_logp * w_logp).sum() + (ref_ent * w_ent).sum()).backward()

    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(ent, ref_ent)
    assert mine.grad.dtype == dtype
    tol = {} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(mine.grad, ref.grad, **tol)


def test_selective_logprobs_gradient_without_entropy():
    """Only log p used downstream: the entropy term of the backward is skipped and the gradient is exact."""
    logits = torch.randn(2, 4, 7, requires_grad=True)
    targets = torch.randint(0, 7, (2, 4))
    selective_logprobs(logits, targets, temperature=1.3)[0].sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    torch.log_softmax(ref / 1.3, -1).gather(-1, targets.unsqueeze(-1)).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    assert completion_mask(ids, [2]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_generate_groups_and_masks(tiny_policy):
    torch.manual_seed(0)
    prompts = [Prompt("1+1=", answer="2"), Prompt("12+30=", answer="42")]
    r = generate(tiny_policy, prompts, group_size=3, max_new_tokens=5)
    assert len(r) == 6
    assert r.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert r.prompts[:3] == ["1+1="] * 3 and r.info[4]["answer"] == "42"
    assert r.completion_ids.shape[1] <= 5
    pad = tiny_policy.tokenizer.pad_token_id
    assert (r.completion_ids[r.completion_mask == 0] == pad).all()
    # prompts are left-padded: the shorter prompt starts with padding
    assert r.prompt_mask[0, 0].item() == 0 and r.prompt_mask[3].all()


def test_scoring_is_independent_of_padding(tiny_policy):
    """Left padding (with shifted position ids) must not change any completion log-prob."""
    torch.manual_seed(1)
    prompts = [Prompt("3+4="), Prompt("123+456=")]
    batch = generate(tiny_policy, prompts, group_size=1, max_new_tokens=6)
    together = score_completions(tiny_policy.model, batch).logprobs
    for i, p in enumerate(prompts):
        alone_batch = batch.select([i])
        keep = alone_batch.prompt_mask[0].bool()
        alone_batch.prompt_ids = alone_batch.prompt_ids[:, keep]
        alone_batch.prompt_mask = alone_batch.prompt_mask[:, keep]
        alone = score_completions(tiny_policy.model, alone_batch).logprobs
        m = batch.completion_mask[i].bool()
        torch.testing.assert_close(together[i][m], alone[0][m], atol=1e-5, rtol=1e-5)


def test_scoring_matches_a_manual_forward(tiny_policy):
    tok, model = tiny_policy.tokenizer, tiny_policy.model
    ids = tok("5+5=10", add_special_tokens=False, return_tensors="pt")["input_ids"]
    r = Rollouts(prompt_ids=ids[:, :4], prompt_mask=torch.ones(1, 4, dtype=torch.long),
                 completion_ids=ids[:, 4:], completion_mask=torch.ones(1, 2, dtype=torch.long),
                 group_ids=torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        logits = model(ids).logits
        expected = torch.log_softmax(logits[0, 3:5], -1).gather(-1, ids[0, 4:6, None]).squeeze(-1)
        got = score_completions(model, r).logprobs[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _rollouts(n: int, t: int, p: int = 2) -> Rollouts:
    return Rollouts(prompt_ids=torch.arange(n * p).reshape(n, p), prompt_mask=torch.ones(n, p),
                    completion_ids=torch.arange(n * t).reshape(n, t), completion_mask=torch.ones(n, t),
                    group_ids=torch.arange(n), rewards=torch.arange(n, dtype=torch.float32),
                    completions=[f"c{i}" for i in range(n)], info=[{"i": i} for i in range(n)])


def test_rollouts_select_and_concat():
    r = _rollouts(4, 3)
    sub = r.select([2, 0])
    assert sub.rewards.tolist() == [2.0, 0.0] and sub.completions == ["c2", "c0"] and sub.info[0] == {"i": 2}
    joined = Rollouts.concat([r, _rollouts(2, 5, p=3)], pad_token_id=-1)
    assert joined.completion_ids.shape == (6, 5) and joined.prompt_ids.shape == (6, 3)
    assert joined.completion_ids[0].tolist() == [0, 1, 2, -1, -1]  # completions pad on the right
    assert joined.prompt_ids[0].tolist() == [-1, 0, 1]  # prompts pad on the left
    assert joined.completion_mask[0].tolist() == [1, 1, 1, 0, 0]
    assert joined.rewards.tolist() == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_shared_prompt_scoring_equals_full_scoring(tmp_path, monkeypatch, arch):
    """Prompts run once per group (keys/values repeated): log-probs, entropy, values and gradients unchanged."""
    import rlctl.models.logprobs as models
    from rlctl.models import Policy, ValueHead, load_policy
    from rlctl.recipe import ModelConfig

    path = build_tiny_model(tmp_path / arch, arch=arch, hidden_size=32, num_layers=2, num_heads=2)
    policy = Policy(*load_policy(ModelConfig(name=str(path))))
    torch.manual_seed(0)
    # ragged prompts (left padding), groups of 3, completions that stop at different lengths
    prompts = [Prompt("12+7=", answer="19"), Prompt("3+4=", answer="7"), Prompt("140+9=", answer="149")]
    r = generate(policy, prompts, 3, max_new_tokens=6, temperature=0.8)
    head = ValueHead(32)
    torch.nn.init.normal_(head.proj.weight)
    weights = torch.randn(r.completion_ids.shape)
    assert models._prompt_groups(policy.model, r)[1].tolist() == [3, 3, 3]

    def scored(shared: bool):
        monkeypatch.setenv("RLCTL_SHARED_PROMPTS", "1" if shared else "0")
        policy.model.zero_grad()
        head.zero_grad()
        out = score_completions(policy.model, r, value_head=head, with_entropy=True)
        (((out.logprobs + out.entropy + out.values) * weights) * r.completion_mask).sum().backward()
        grads = [p.grad.clone() for p in [*policy.model.parameters(), *head.parameters()]]
        return out, grads

    (shared, shared_grads), (full, full_grads) = scored(True), scored(False)
    torch.testing.assert_close(shared.logprobs, full.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.entropy, full.entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.values, full.values, atol=1e-5, rtol=1e-5)
    for a, b in zip(shared_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_prompts_are_shared_only_when_it_saves_enough(tiny_policy):
    import rlctl.models.logprobs as models

    r = generate(tiny_policy, [Prompt("1+1="), Prompt("2+2=")], 4, max_new_tokens=3)
    assert models._prompt_groups(tiny_policy.model, r)[0].tolist() == [0, 4]
    one_each = r.select([0, 4])  # groups of one completion: nothing to share
    assert models._prompt_groups(tiny_policy.model, one_each) is None
    wrapped = torch.nn.Sequential(tiny_policy.model)  # e.g. a DDP wrapper: one forward per backward
    assert models._prompt_groups(wrapped, r) is None


def test_no_fp32_full_vocabulary_tensor_is_kept_for_the_backward_pass(tmp_path, monkeypatch):
    """A bf16 model's logits stay bf16: the log-probs keep one log-normaliser per position, not fp32 logits.

    This is the path through the model's own logits (a head that is not a plain Linear, a wrapped model);
    with a plain head no logits are kept at all (``tests/test_chunked_logprobs.py``)."""
    monkeypatch.setenv("RLCTL_CHUNKED_HEAD", "0")
    from rlctl.models import load_policy
    from rlctl.recipe import ModelConfig

    path = build_tiny_model(tmp_path / "bf16", hidden_size=32, num_layers=1, num_heads=2)
    model, tok = load_policy(ModelConfig(name=str(path), dtype="bfloat16"))
    from rlctl.models import Policy

    r = generate(Policy(model, tok), [Prompt("1+1="), Prompt("20+2=")], 2, max_new_tokens=4)
    vocab = model.config.vocab_size
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = score_completions(model, r)
    full_vocab = [(dtype, shape) for dtype, shape in saved if shape and shape[-1] == vocab]
    assert full_vocab, "the logits should be among the saved tensors"
    assert all(dtype != torch.float32 for dtype, _ in full_vocab), full_vocab
    out.logprobs.sum().backward()
    assert model.lm_head.weight.grad is not None or model.model.embed_tokens.weight.grad is not None


def test_cpu_draws_follow_the_distribution_and_never_pick_a_zero_probability_token():
    """The CPU's inverse-CDF draw (one uniform number per row) samples each token with its probability."""
    from rlctl.models.generation import _draw

    torch.manual_seed(0)
    probs = torch.tensor([[0.1, 0.2, 0.0, 0.7, 0.0]]).repeat(200_000, 1)
    freq = torch.bincount(_draw(probs).squeeze(1), minlength=5).float() / len(probs)
    assert torch.allclose(freq, probs[0], atol=4e-3)  # about 4 standard errors
    assert freq[2] == 0 and freq[4] == 0
    edge = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert _draw(edge).squeeze(1).tolist() == [0, 2, 1]
    torch.manual_seed(1)
    first = _draw(probs[:100])
    torch.manual_seed(1)
    assert torch.equal(first, _draw(probs[:100]))
