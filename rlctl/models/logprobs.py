"""Log-probabilities of completions under a policy.

``score_completions`` scores a batch: from the decoder's hidden states through the vocabulary projection
a block of rows at a time (``projected_logprobs``: no [N, T, V] logits), rows in buckets of similar
length (``length_buckets``), each shared prompt run once per group. ``selective_logprobs`` is the
block-wise scoring of logits a model's own forward returned (the path for heads it cannot project).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_BLOCK_ELEMENTS = 2**22  # fp32 elements of one block of full-vocabulary rows (16 MiB)


def selective_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                       with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) (and optionally entropy) per position of ``logits`` [N, T, V], in fp32.

    Forward and backward both work through one block of rows at a time: at most one block of
    full-vocabulary fp32 values exists at once, and what is kept for the backward pass is the logits
    themselves (in their own dtype, which the caller holds anyway) and one log-normaliser per position,
    not an fp32 log-softmax of the whole batch. The gradient w.r.t. the logits is written in their dtype.
    """
    rows = max(1, _BLOCK_ELEMENTS // max(1, logits.shape[-1] * max(1, logits.shape[-2])))
    logp, ent = _SelectiveLogprobs.apply(logits, targets, float(temperature), bool(with_entropy), rows)
    return logp, (ent if with_entropy else None)


class _SelectiveLogprobs(torch.autograd.Function):
    """(log p[target], entropy) of softmax(logits / temperature), computed block by block.

    With x = logits / temperature, p = softmax(x), lse = logsumexp(x) and H = lse - sum(p x):
    d log p[y] / dx = onehot(y) - p,   dH / dx = -p (log p + H);   chain rule: d/dlogits = (d/dx) / temperature.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
                rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = logits.shape[0]
        logp = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        for s in range(0, n, rows):
            x = logits[s:s + rows].float()
            if temperature != 1.0:
                x = x / temperature
            _block_stats(x, targets[s:s + rows], lse[s:s + rows], logp[s:s + rows],
                         ent[s:s + rows] if with_entropy else None)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.temperature, ctx.with_entropy, ctx.rows = temperature, with_entropy, rows
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor | None, grad_ent: torch.Tensor | None) -> tuple[Any, ...]:
        logits, targets, lse, ent = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        use_ent = ctx.with_entropy and grad_ent is not None
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], rows):
            grad[s:s + rows] = _block_grad(logits[s:s + rows].float(), t, slice(s, s + rows), lse, targets,
                                           grad_logp, ent if use_ent else None, grad_ent)
        return grad, None, None, None, None


class _ProjectedLogprobs(torch.autograd.Function):
    """(log p[target], entropy) of softmax((hidden @ W.T + b) / temperature), a block of rows at a time.

    The logits of a block exist only while that block is worked on, in the forward pass and again in
    the backward pass (recomputed: one more [rows, H] x [H, V] product per block), so the vocabulary
    projection never materialises [positions, V] logits; what is kept for the backward pass is the
    hidden states, the weight (a parameter, not a copy) and one log-normaliser (and entropy) per position.
    The logits are computed in the dtype ``lm_head`` would use (autocast included) and their gradient is
    rounded to that dtype, as autograd through ``lm_head`` and ``selective_logprobs`` does.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, temperature: float, with_entropy: bool, rows: int,
                compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        n = h.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
        with torch.autocast(h.device.type, enabled=False):  # the dtypes are chosen above, as autocast would
            for s in range(0, n, rows):
                x = torch.nn.functional.linear(h[s:s + rows], w, b).float()
                if temperature != 1.0:
                    x = x / temperature
                _block_stats(x, targets[s:s + rows], lse[s:s + rows], logp[s:s + rows],
                             ent[s:s + rows] if with_entropy else None)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.with_entropy, ctx.rows, ctx.compute_dtype = temperature, with_entropy, rows, compute_dtype
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx: Any, grad_logp: torch.Tensor | None, grad_ent: torch.Tensor | None) -> tuple[Any, ...]:
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        t, rows, dtype = ctx.temperature, ctx.rows, ctx.compute_dtype
        use_ent = ctx.with_entropy and grad_ent is not None
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        grad_h = torch.empty_like(h) if want_h else None
        # the weight's gradient adds up over blocks: in fp32, so that bf16 blocks lose nothing in the sum
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], rows):
                h_b = h[s:s + rows]
                g = _block_grad(torch.nn.functional.linear(h_b, w, b).float(), t, slice(s, s + rows), lse, targets,
                                grad_logp, ent if use_ent else None, grad_ent)
                g = g.to(dtype)  # the logits' gradient in the logits' dtype, as autograd would hold it
                if want_h:
                    grad_h[s:s + rows] = g @ w
                if want_w:
                    if dtype == torch.float32:
                        grad_w.addmm_(g.t(), h_b)
                    else:
                        grad_w.add_(g.t() @ h_b)
                if want_b:
                    grad_b.add_(g.float().sum(0))
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def _block_stats(x: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, logp: torch.Tensor,
                 ent: torch.Tensor | None) -> None:
    """Fill one block's log-normaliser, target log-probs and (if given) entropies from its fp32 logits x."""
    lse_b = torch.logsumexp(x, dim=-1)
    lse.copy_(lse_b)
    logp.copy_(x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse_b)
    if ent is not None:
        ent.copy_(lse_b - (torch.softmax(x, dim=-1) * x).sum(-1))


def _block_grad(x: torch.Tensor, t: float, rows: slice, lse: torch.Tensor, targets: torch.Tensor,
                grad_logp: torch.Tensor | None, ent: torch.Tensor | None,
                grad_ent: torch.Tensor | None) -> torch.Tensor:
    """d(loss)/d(logits) of the block ``rows`` from its fp32 logits x (before the temperature); ``ent``
    None when the entropy has no gradient."""
    if t != 1.0:
        x = x / t
    g = _logits_grad(x, lse[rows], targets[rows], None if grad_logp is None else grad_logp[rows],
                     None if ent is None else ent[rows], None if ent is None else grad_ent[rows])
    if t != 1.0:
        g.div_(t)
    return g


def _logits_grad(x: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, grad_logp: torch.Tensor | None,
                 ent: torch.Tensor | None, grad_ent: torch.Tensor | None) -> torch.Tensor:
    """d(loss)/dx for x = logits / temperature of one block, fp32 (see ``_SelectiveLogprobs``)."""
    logsm = x - lse.unsqueeze(-1)
    p = logsm.exp()
    g = torch.zeros_like(p)
    if grad_logp is not None:
        gl = grad_logp.unsqueeze(-1).float()
        g.sub_(p * gl)
        g.scatter_add_(-1, targets.unsqueeze(-1), gl)
    if ent is not None:
        g.sub_(p * (logsm + ent.unsqueeze(-1)) * grad_ent.unsqueeze(-1).float())
    return g


@dataclass
class Head:
    """The decoder (hidden states) and the plain vocabulary projection after it: logits = lm_head(hidden)."""

    decoder: nn.Module
    lm_head: nn.Linear


def projected_logprobs(hidden: torch.Tensor, lm_head: nn.Linear, targets: torch.Tensor, temperature: float = 1.0,
                       with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``selective_logprobs(lm_head(hidden), targets, ...)`` for hidden [N, T, H], without [N, T, V] logits."""
    shape = targets.shape
    flat = hidden.reshape(-1, hidden.shape[-1])
    vocab = lm_head.weight.shape[0]
    rows = max(1, _BLOCK_ELEMENTS // max(1, vocab))
    logp, ent = _ProjectedLogprobs.apply(flat, lm_head.weight, lm_head.bias, targets.reshape(-1),
                                         float(temperature), bool(with_entropy), rows, _compute_dtype(lm_head, flat))
    return logp.view(shape), (ent.view(shape) if with_entropy else None)


def _compute_dtype(lm_head: nn.Linear, hidden: torch.Tensor) -> torch.dtype:
    """The dtype ``lm_head(hidden)`` computes in: autocast's where it is on, else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return lm_head.weight.dtype


# logits are lm_head(hidden) only when the model does nothing to them after the projection
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_checked_heads: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def head_of(model: nn.Module) -> Head | None:
    """The decoder and plain ``lm_head`` of ``model`` when log-probs may be computed from hidden states.

    None (score through the model's own forward) for wrapped or sharded models (DDP's and FSDP's hooks
    must see the whole forward), a head that is not a plain ``nn.Linear`` (LoRA on the head, peft's
    wrappers, a head with forward hooks), logits post-processed after the projection (soft-capping, scaling), prompt-learning
    adapters, or when ``RLCTL_CHUNKED_HEAD=0``. The first time a model is seen, one short forward checks
    that its logits are the head of its decoder's hidden states.
    """
    if os.environ.get("RLCTL_CHUNKED_HEAD", "1") == "0" or not _bare(model):
        return None
    base = model
    if hasattr(model, "get_base_model"):  # peft: only adapters that live inside the layers (LoRA)
        if getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", True):
            return None
        base = model.get_base_model()
    config = getattr(base, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    if any(getattr(c, name, None) not in (None, 1, 1.0) for c in {id(config): config, id(text): text}.values()
           for name in _LOGIT_POSTPROCESSING):
        return None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    lm_head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or decoder is base or type(lm_head) is not nn.Linear:
        return None
    if lm_head._forward_hooks or lm_head._forward_pre_hooks:  # the projection below would bypass them
        return None
    head = Head(decoder, lm_head)
    if base not in _checked_heads:
        _checked_heads[base] = _logits_are_head_of_hidden(model, head)
    return head if _checked_heads[base] else None


def _bare(model: nn.Module) -> bool:
    """Not wrapped by DDP and not sharded by FSDP2."""
    return hasattr(model, "config") and not isinstance(model, nn.parallel.DistributedDataParallel) \
        and not _is_sharded(model)


@torch.no_grad()
def _logits_are_head_of_hidden(model: nn.Module, head: Head) -> bool:
    """One 4-token forward (eval mode: no dropout): the model's logits against lm_head(decoder(...))."""
    device = head.lm_head.weight.device
    vocab = head.lm_head.weight.shape[0]
    ids = torch.arange(4, device=device).unsqueeze(0) % max(1, vocab)
    was_training = model.training
    model.eval()
    try:
        want = model(input_ids=ids, use_cache=False).logits
        got = head.lm_head(head.decoder(input_ids=ids, use_cache=False).last_hidden_state)
    except Exception:
        return False
    finally:
        model.train(was_training)
    return want.shape == got.shape and bool(torch.allclose(want.float(), got.float(), rtol=1e-4, atol=1e-4))


@dataclass
class ForwardOut:
    logprobs: torch.Tensor  # [N, T]
    entropy: torch.Tensor | None = None  # [N, T]
    values: torch.Tensor | None = None  # [N, T]


def score_completions(model: nn.Module, rollouts: Any, value_head: nn.Module | None = None,
                      with_entropy: bool = False) -> ForwardOut:
    """Log-probs of each completion token under ``model`` (and entropy, and values from ``value_head``).

    * From hidden states through the vocabulary projection a block of rows at a time (``head_of``,
      ``projected_logprobs``) where the model allows it: no [N, T, V] logits, in the forward or the backward.
    * Rows are scored in buckets of similar completion length, each cut to its longest completion
      (``length_buckets``): the forward and backward passes run on the real tokens, not on padding.
      Positions after a row's last completion token get log-prob, entropy and value 0.
    * When the completions of a group share their prompt and the prompt is a large enough part of the
      batch, the prompt runs once per group and its keys/values are shared by the group's rows
      (``_score_shared_prompts``).

    All three give the numbers and gradients of one forward over the whole padded batch. A wrapped or
    sharded model (DDP, FSDP2) runs one forward, cut to the longest completion.
    """
    head = head_of(model)
    lengths = _row_lengths(rollouts.completion_mask)
    shared = _prompt_groups(model, rollouts)
    prompt_cost = 0 if shared is not None else rollouts.prompt_ids.shape[1]
    if os.environ.get("RLCTL_LENGTH_BUCKETS", "1") == "0":  # one forward over the whole padded batch
        buckets = [(torch.arange(len(lengths)), rollouts.completion_ids.shape[1])]
    elif _bare(model):
        buckets = length_buckets(lengths, prompt_cost)
    else:  # DDP's and FSDP's hooks expect one forward per backward: cut to the longest completion only
        buckets = [(torch.arange(len(lengths)), int(lengths.max()))]
    if shared is not None:
        parts = _score_shared_prompts(model, head, rollouts, *shared, buckets, value_head, with_entropy)
    else:
        parts = [_score_rows(model, head, rollouts, rows, length, value_head, with_entropy)
                 for rows, length in buckets]
    return _assemble(parts, buckets, lengths, rollouts.completion_ids.shape[1])


def _row_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Tokens up to and including each row's last completion token (at least 1), on the CPU."""
    mask = mask.detach().to("cpu") != 0
    t = mask.shape[1]
    last = torch.where(mask, torch.arange(1, t + 1), 0).amax(dim=1) if t else torch.zeros(len(mask), dtype=torch.long)
    return last.clamp(min=1, max=max(1, t))


# a bucket costs as much as this many more tokens (one more forward and backward through every layer)
BUCKET_OVERHEAD_TOKENS = 64


def length_buckets(lengths: torch.Tensor, prompt_cost: int = 0,
                   overhead: int = BUCKET_OVERHEAD_TOKENS) -> list[tuple[torch.Tensor, int]]:
    """(rows, length) buckets covering every row once, each cut to its longest row, chosen to minimise
    the tokens run (``prompt_cost`` more per row) plus ``overhead`` per bucket.

    Dynamic programming over the distinct lengths, longest first: a bucket is a run of them.
    """
    distinct, counts = torch.unique(lengths, return_counts=True)
    distinct, counts = distinct.flip(0).tolist(), counts.flip(0).tolist()  # longest first
    k = len(distinct)
    best = [0.0] + [float("inf")] * k  # best[j]: cost of the j longest distinct lengths
    cut = [0] * (k + 1)
    for j in range(1, k + 1):
        rows = 0
        for i in range(j - 1, -1, -1):  # bucket = distinct lengths i .. j-1, cut to distinct[i]
            rows += counts[i]
            cost = best[i] + rows * (distinct[i] + prompt_cost) + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], k
    while j > 0:
        i = cut[j]
        longest, shortest = distinct[i], distinct[j - 1]
        rows = ((lengths <= longest) & (lengths >= shortest)).nonzero().squeeze(-1)
        buckets.append((rows, int(longest)))
        j = i
    return buckets[::-1]


def _assemble(parts: list[ForwardOut], buckets: list[tuple[torch.Tensor, int]], lengths: torch.Tensor,
              width: int) -> ForwardOut:
    """The buckets' outputs [rows, length] back in the batch's row order, ``width`` wide, with 0 after each
    row's last completion token (whatever bucket it was scored in)."""
    order = torch.cat([rows for rows, _ in buckets])
    device = parts[0].logprobs.device
    inverse = torch.argsort(order).to(device)
    scored = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    scored = None if bool(scored.all()) else scored.to(device)

    def join(name: str) -> torch.Tensor | None:
        pieces = [getattr(p, name) for p in parts]
        if pieces[0] is None:
            return None
        padded = [torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in pieces]
        whole = padded[0] if len(padded) == 1 else torch.cat(padded)
        if len(parts) > 1 or not bool((order == torch.arange(len(order))).all()):
            whole = whole[inverse]
        return whole if scored is None else whole.masked_fill(~scored, 0.0)

    return ForwardOut(logprobs=join("logprobs"), entropy=join("entropy"), values=join("values"))


def _score(head: Head | None, feats: torch.Tensor, targets: torch.Tensor, temperature: float,
           with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropy) from hidden states through ``head``, or from logits when there is none."""
    if head is not None:
        return projected_logprobs(feats, head.lm_head, targets, temperature, with_entropy)
    return selective_logprobs(feats, targets, temperature, with_entropy)


def _forward(model: nn.Module, head: Head | None, want_hidden: bool, keep: int, **inputs: Any) -> tuple[Any, Any]:
    """(the last positions' hidden states or, without a head, logits; the output, for hidden states)."""
    if head is not None:
        out = head.decoder(output_hidden_states=want_hidden, **inputs)
        return out.last_hidden_state[:, -keep:] if keep else out.last_hidden_state[:, :0], out
    out = model(output_hidden_states=want_hidden, logits_to_keep=keep, **inputs)
    return out.logits[:, -keep:] if keep else out.logits[:, :0], out


def _score_rows(model: nn.Module, head: Head | None, rollouts: Any, rows: torch.Tensor, length: int,
                value_head: nn.Module | None, with_entropy: bool) -> ForwardOut:
    """One forward over the prompt and the first ``length`` completion tokens of ``rows``."""
    p_len = rollouts.prompt_ids.shape[1]
    whole = rows.numel() == len(rollouts) and length == rollouts.completion_ids.shape[1]
    pick = (lambda x: x) if whole else (lambda x: x[rows.to(x.device), :p_len + length])
    input_ids, attention = pick(rollouts.input_ids), pick(rollouts.attention_mask)
    # position ids that skip left padding, so padded and unpadded prompts score identically
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    feats, out = _forward(model, head, value_head is not None, length + 1, input_ids=input_ids,
                          attention_mask=attention, position_ids=positions, use_cache=False)
    # position i predicts token i+1: the completion is predicted by positions p_len-1 .. end-1
    targets = rollouts.completion_ids if whole else rollouts.completion_ids[rows.to(input_ids.device), :length]
    logprobs, entropy = _score(head, feats[:, :-1], targets, rollouts.temperature, with_entropy)
    values = None
    if value_head is not None:
        values = value_head(out.hidden_states[-1][:, p_len - 1:-1, :].float())
    return ForwardOut(logprobs=logprobs, entropy=entropy, values=values)


# share the prompt when that removes at least this fraction of the batch's tokens from the forward pass
SHARED_PROMPT_MIN_SAVING = 0.1


def _is_sharded(model: nn.Module) -> bool:
    """An FSDP2-sharded model: every process must run the same forwards, whatever its batch."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def _prompt_groups(model: nn.Module, rollouts: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first row, rows) of each run of rows with one prompt, when sharing the prompt is worth it and safe.

    Safe means a bare model (a DDP/FSDP wrapper expects one forward per backward), the cache-aware
    ``transformers`` forward (a cache argument), and no activation checkpointing (which turns the
    cache off in training).
    """
    if os.environ.get("RLCTL_SHARED_PROMPTS", "1") == "0":
        return None
    if not _bare(model):
        return None
    if getattr(model, "is_activation_checkpointing", False) or getattr(model.config, "is_encoder_decoder", False):
        return None
    prompt_ids, prompt_mask = rollouts.prompt_ids, rollouts.prompt_mask
    n, p_len = prompt_ids.shape
    if n < 2 or p_len == 0:
        return None
    new_run = torch.ones(n, dtype=torch.bool, device=prompt_ids.device)
    new_run[1:] = (prompt_ids[1:] != prompt_ids[:-1]).any(-1) | (prompt_mask[1:] != prompt_mask[:-1]).any(-1)
    first = new_run.nonzero().squeeze(-1)
    rows = torch.diff(first, append=torch.tensor([n], device=first.device))
    saved = (n - len(first)) * p_len
    if saved < SHARED_PROMPT_MIN_SAVING * n * (p_len + rollouts.completion_ids.shape[1]):
        return None
    return first, rows


def _score_shared_prompts(model: nn.Module, head: Head | None, rollouts: Any, first: torch.Tensor,
                          rows: torch.Tensor, buckets: list[tuple[torch.Tensor, int]],
                          value_head: nn.Module | None, with_entropy: bool) -> list[ForwardOut]:
    """Each distinct prompt run once; then each bucket's completions, with the keys/values of their
    prompts repeated per row. Gradients flow through the repeated keys/values back into the one prompt
    pass (summed over its rows), so the update equals the one from scoring every row in full.
    """
    from rlctl.models.generation import new_cache, with_cache

    cache = new_cache(model)
    attention = rollouts.attention_mask
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    p_len = rollouts.prompt_ids.shape[1]
    want_hidden = value_head is not None
    prompt_last, prompt_out = _forward(model, head, want_hidden, 1, input_ids=rollouts.prompt_ids[first],
                                       attention_mask=rollouts.prompt_mask[first],
                                       position_ids=positions[first, :p_len], **with_cache(model, cache))
    prompt_of_row = torch.repeat_interleave(torch.arange(len(first), device=first.device), rows)
    prompt_kv = [(layer.keys, layer.values) for layer in cache.layers]
    parts = []
    for bucket, length in buckets:
        sel = prompt_of_row[bucket.to(prompt_of_row.device)]
        bucket_cache = new_cache(model)
        for i, (keys, values) in enumerate(prompt_kv):
            bucket_cache.update(keys[sel], values[sel], i)
        b = bucket.to(attention.device)
        feats, out = _forward(model, head, want_hidden, length, input_ids=rollouts.completion_ids[b, :length],
                              attention_mask=attention[b, :p_len + length],
                              position_ids=positions[b, p_len:p_len + length], **with_cache(model, bucket_cache))
        # the first completion token is predicted by the prompt's last position, the others by the completion
        feats = torch.cat([prompt_last[sel], feats[:, :-1]], dim=1)
        logprobs, entropy = _score(head, feats, rollouts.completion_ids[b, :length], rollouts.temperature,
                                   with_entropy)
        values = None
        if value_head is not None:
            hidden = torch.cat([prompt_out.hidden_states[-1][sel, -1:, :], out.hidden_states[-1][:, :-1, :]], dim=1)
            values = value_head(hidden.float())
        parts.append(ForwardOut(logprobs=logprobs, entropy=entropy, values=values))
    return parts
