"""Log-probs from hidden states through the vocabulary projection, a block of rows at a time, and rows
scored in buckets of similar length: the same numbers and gradients as one forward over the padded
batch through the model's own logits, and no [rows, T, V] tensor kept for the backward pass."""

from __future__ import annotations

import pytest
import torch

import rlctl.models.logprobs as lp
from rlctl import testing
from rlctl.models import Policy, ValueHead, build_tiny_model, load_policy, score_completions
from rlctl.models.generation import generate
from rlctl.recipe import ModelConfig
from rlctl.rollouts import Prompt, Rollouts

PROMPTS = [Prompt("12+7=", answer="19"), Prompt("3+4=", answer="7"), Prompt("140+9=", answer="149")]


def _old_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Score as before: the model's own [N, T, V] logits, one forward over the whole padded batch."""
    monkeypatch.setenv("RLCTL_CHUNKED_HEAD", "0")
    monkeypatch.setenv("RLCTL_LENGTH_BUCKETS", "0")


def _new_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RLCTL_CHUNKED_HEAD", raising=False)
    monkeypatch.delenv("RLCTL_LENGTH_BUCKETS", raising=False)


def _scored(model, head, r: Rollouts, weights: torch.Tensor, with_entropy: bool = True):
    """Outputs and every trainable parameter's gradient of a loss that uses log-probs, entropy and values."""
    params = [p for p in [*model.parameters(), *(head.parameters() if head else [])] if p.requires_grad]
    for p in params:
        p.grad = None
    out = score_completions(model, r, value_head=head, with_entropy=with_entropy)
    total = out.logprobs + (out.entropy if with_entropy else 0) + (out.values if head is not None else 0)
    ((total * weights) * r.completion_mask).sum().backward()
    return out, [p.grad.clone() for p in params]


def _assert_same(new, old, r: Rollouts, tol: float = 1e-5, grad_tol: float = 1e-4, norm_tol: float = 0.0) -> None:
    """Outputs equal on the completion tokens, gradients elementwise (or, with ``norm_tol``, per tensor:
    ||new - old|| <= norm_tol ||old||, for a deep model whose fp32 gradients carry rounding noise)."""
    mask = r.completion_mask.bool()
    new_out, new_grads = new
    old_out, old_grads = old
    for name in ("logprobs", "entropy", "values"):
        a, b = getattr(new_out, name), getattr(old_out, name)
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a[mask], b[mask], atol=tol, rtol=tol)
    assert len(new_grads) == len(old_grads) > 0
    for a, b in zip(new_grads, old_grads):
        if norm_tol:
            assert (a - b).norm() <= norm_tol * b.norm(), ((a - b).norm() / b.norm()).item()
        else:
            torch.testing.assert_close(a, b, atol=grad_tol, rtol=grad_tol)


@pytest.fixture
def ragged(tmp_path):
    """A tiny model, groups of 3 completions of different lengths after left-padded prompts."""
    def make(arch: str = "llama") -> tuple[Policy, Rollouts]:
        path = build_tiny_model(tmp_path / arch, arch=arch, hidden_size=32, num_layers=2, num_heads=2)
        policy = Policy(*load_policy(ModelConfig(name=str(path))))
        torch.manual_seed(0)
        r = generate(policy, PROMPTS, 3, max_new_tokens=8, temperature=0.8)
        # a random tiny model seldom stops: cut each row at a seeded length, as natural EOS would
        keep = torch.randint(1, r.completion_ids.shape[1] + 1, (len(r),), generator=torch.Generator().manual_seed(3))
        cut = torch.arange(r.completion_ids.shape[1]).unsqueeze(0) >= keep.unsqueeze(1)
        r.completion_mask = r.completion_mask.masked_fill(cut, 0)
        r.completion_ids = r.completion_ids.masked_fill(cut, policy.tokenizer.pad_token_id)
        lengths = r.completion_mask.sum(1)
        assert lengths.min() < lengths.max(), "the test needs completions of different lengths"
        return policy, r
    return make


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("shared", [True, False])
def test_chunked_scoring_equals_full_logits(ragged, monkeypatch, arch, shared):
    policy, r = ragged(arch)
    r.temperature = 0.7  # the projection divides by it too
    monkeypatch.setenv("RLCTL_SHARED_PROMPTS", "1" if shared else "0")
    assert (lp._prompt_groups(policy.model, r) is not None) == shared
    head = ValueHead(32)
    torch.nn.init.normal_(head.proj.weight)
    weights = torch.randn(r.completion_ids.shape)
    _new_path(monkeypatch)
    assert lp.head_of(policy.model) is not None
    new = _scored(policy.model, head, r, weights)
    _old_path(monkeypatch)
    old = _scored(policy.model, head, r, weights)
    _assert_same(new, old, r)
    # positions after a row's last completion token are not scored: zero, not a log-prob of padding
    assert (new[0].logprobs[r.completion_mask == 0] == 0).all()


def test_length_buckets_cover_every_row_once_and_follow_the_lengths():
    lengths = torch.tensor([64, 3, 5, 64, 30, 31, 4, 29])
    buckets = lp.length_buckets(lengths, overhead=8)
    rows = torch.cat([b for b, _ in buckets]).sort().values
    assert rows.tolist() == list(range(len(lengths)))
    for b, length in buckets:
        assert int(lengths[b].max()) == length  # each bucket is cut to its longest row
    assert len(buckets) == 3  # {64, 64}, {29..31}, {3..5}: padding costs more than a bucket here
    ran = sum(len(b) * length for b, length in buckets)
    assert ran < 0.6 * len(lengths) * 64
    # a large overhead per bucket: one bucket, cut to the longest row
    assert [(b.tolist(), n) for b, n in lp.length_buckets(lengths, overhead=10**6)] == [(list(range(8)), 64)]


def test_chunked_blocks_give_the_same_gradient(monkeypatch):
    """Blocks of a few rows (forward and backward) against one block, with a bias, at a temperature."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    weights = torch.randn(3, 7)

    def run(block: int):
        monkeypatch.setattr(lp, "_BLOCK_ELEMENTS", block)
        for t in (hidden, head.weight, head.bias):
            t.grad = None
        logp, ent = lp.projected_logprobs(hidden, head, targets, temperature=1.3, with_entropy=True)
        ((logp + 0.5 * ent) * weights).sum().backward()
        return logp, ent, [t.grad.clone() for t in (hidden, head.weight, head.bias)]

    blocks, whole = run(50 * 2), run(50 * 21)
    logits = head(hidden).detach() / 1.3
    want = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(blocks[0], want, atol=1e-5, rtol=1e-5)
    for a, b in zip(blocks, whole):
        if isinstance(a, list):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
@pytest.mark.parametrize("on_head", [False, True])
def test_lora_models(ragged, monkeypatch, on_head):
    """LoRA inside the layers: the projection path, same gradients; LoRA on the head: the model's logits."""
    from rlctl.models.lora import apply_lora

    policy, r = ragged()
    targets = ["q_proj", "v_proj", "lm_head"] if on_head else "all-linear"
    model = apply_lora(policy.model, {"r": 4, "alpha": 8, "target_modules": targets})
    for name, p in model.named_parameters():
        if "lora_B" in name:  # fresh adapters are zero: give them weights, so that they change the forward
            torch.nn.init.normal_(p, std=0.1)
    _new_path(monkeypatch)
    assert (lp.head_of(model) is None) == on_head
    weights = torch.randn(r.completion_ids.shape)
    new = _scored(model, None, r, weights)
    _old_path(monkeypatch)
    old = _scored(model, None, r, weights)
    _assert_same(new, old, r)


def test_post_processed_or_wrapped_logits_use_the_models_forward(ragged):
    policy, _ = ragged()
    model = policy.model
    assert lp.head_of(model) is not None
    assert lp.head_of(torch.nn.Sequential(model)) is None  # a wrapper (DDP-like) has no config of its own
    model.config.final_logit_softcapping = 30.0
    try:
        assert lp.head_of(model) is None
    finally:
        model.config.final_logit_softcapping = None
    lp._checked_heads.pop(model, None)
    real_head = model.lm_head
    model.lm_head = torch.nn.Sequential(real_head)  # not a plain Linear
    try:
        assert lp.head_of(model) is None
    finally:
        model.lm_head = real_head


def test_a_forward_that_changes_the_logits_is_detected(ragged, monkeypatch):
    """The one-time check: a model whose forward does more than lm_head(hidden) keeps its own forward."""
    policy, _ = ragged()
    model = policy.model
    forward = type(model).forward

    def scaled(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 2
        return out

    lp._checked_heads.pop(model, None)
    monkeypatch.setattr(type(model), "forward", scaled)
    try:
        assert lp.head_of(model) is None
    finally:
        lp._checked_heads.pop(model, None)


# -------------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def real():
    return Policy(*load_policy(ModelConfig(name=str(testing.real_model()))))


def _real_rollouts(policy: Policy, rows: int, t: int, seed: int = 0) -> Rollouts:
    """``rows`` completions of ``t`` random tokens after two chat prompts; row i keeps t - 3 i tokens."""
    gen = torch.Generator().manual_seed(seed)
    tok = policy.tokenizer
    from rlctl.models.generation import encode_prompts

    enc = encode_prompts(tok, ["Mia has 23 stickers. She gets 5 more. How many?", "What is 2+2?"], True)
    pick = torch.arange(rows) % 2
    ids = torch.randint(100, policy.model.config.vocab_size, (rows, t), generator=gen)
    lengths = (t - 3 * torch.arange(rows)).clamp(min=1)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    order = pick.argsort(stable=True)  # groups of one prompt are consecutive rows
    return Rollouts(prompt_ids=enc["input_ids"][pick][order], prompt_mask=enc["attention_mask"][pick][order],
                    completion_ids=ids.masked_fill(mask == 0, tok.pad_token_id)[order],
                    completion_mask=mask[order], group_ids=pick[order], temperature=0.9)


@pytest.mark.parametrize("shared", [True, False])
def test_real_model_chunked_scoring_equals_full_logits(real, monkeypatch, shared):
    r = _real_rollouts(real, rows=4, t=12)
    monkeypatch.setenv("RLCTL_SHARED_PROMPTS", "1" if shared else "0")
    assert (lp._prompt_groups(real.model, r) is not None) == shared
    weights = torch.randn(r.completion_ids.shape, generator=torch.Generator().manual_seed(1))
    real.model.train()
    _new_path(monkeypatch)
    assert lp.head_of(real.model) is not None
    assert real.model.config.tie_word_embeddings  # the projection's gradient adds to the embeddings'
    new = _scored(real.model, None, r, weights)
    _old_path(monkeypatch)
    old = _scored(real.model, None, r, weights)
    # fp32 rounding alone: the old path's own gradients are ~2e-4 (relative) from an fp64 computation
    _assert_same(new, old, r, tol=1e-4, norm_tol=1e-3)


def _largest_saved_activation(model, r: Rollouts) -> int:
    """Elements of the largest tensor autograd saves for the backward pass of the update, parameters aside."""
    params = {p.data_ptr() for p in model.parameters()}
    largest = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            largest[0] = max(largest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = score_completions(model, r, with_entropy=True)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    model.zero_grad(set_to_none=True)
    return largest[0]


def test_real_model_update_keeps_no_full_vocabulary_tensor(real, monkeypatch):
    """With the real model's shapes no saved tensor is [rows, T, V]-sized; through the model's own logits one is."""
    rows, t = 4, 64
    r = _real_rollouts(real, rows=rows, t=t)
    real.model.train()
    limit = rows * t * real.model.config.vocab_size // 2
    _new_path(monkeypatch)
    assert _largest_saved_activation(real.model, r) < limit
    monkeypatch.setenv("RLCTL_CHUNKED_HEAD", "0")  # the old path: the logits are kept for the backward pass
    assert _largest_saved_activation(real.model, r) >= limit
