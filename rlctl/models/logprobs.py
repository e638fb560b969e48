"""Log-probabilities of completions under a policy: block-wise ``selective_logprobs`` with its own
backward, and ``score_completions`` (one forward, or each shared prompt run once per group)."""

from __future__ import annotations

import os
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
            lse_b = torch.logsumexp(x, dim=-1)
            lse[s:s + rows] = lse_b
            logp[s:s + rows] = x.gather(-1, targets[s:s + rows].unsqueeze(-1)).squeeze(-1) - lse_b
            if with_entropy:
                ent[s:s + rows] = lse_b - (torch.softmax(x, dim=-1) * x).sum(-1)
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
            x = logits[s:s + rows].float()
            if t != 1.0:
                x = x / t
            logsm = x - lse[s:s + rows].unsqueeze(-1)
            p = logsm.exp()
            g = torch.zeros_like(p)
            if grad_logp is not None:
                gl = grad_logp[s:s + rows].unsqueeze(-1).float()
                g.sub_(p * gl)
                g.scatter_add_(-1, targets[s:s + rows].unsqueeze(-1), gl)
            if use_ent:
                ge = grad_ent[s:s + rows].unsqueeze(-1).float()
                g.sub_(p * (logsm + ent[s:s + rows].unsqueeze(-1)) * ge)
            if t != 1.0:
                g.div_(t)
            grad[s:s + rows] = g
        return grad, None, None, None, None


@dataclass
class ForwardOut:
    logprobs: torch.Tensor  # [N, T]
    entropy: torch.Tensor | None = None  # [N, T]
    values: torch.Tensor | None = None  # [N, T]


def score_completions(model: nn.Module, rollouts: Any, value_head: nn.Module | None = None,
                      with_entropy: bool = False) -> ForwardOut:
    """Log-probs of each completion token under ``model`` (one forward over prompt + completion).

    When the completions of a group share their prompt and the prompt is a large enough part of the
    batch, the prompt runs once per group and its keys/values are shared by the group's completions
    (``_score_shared_prompts``): the same numbers, fewer FLOPs in the forward and the backward pass.
    """
    shared = _prompt_groups(model, rollouts)
    if shared is not None:
        return _score_shared_prompts(model, rollouts, *shared, value_head, with_entropy)
    input_ids = rollouts.input_ids
    attention = rollouts.attention_mask
    # position ids that skip left padding, so padded and unpadded prompts score identically
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    p_len = rollouts.prompt_ids.shape[1]
    t_len = rollouts.completion_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                output_hidden_states=value_head is not None, use_cache=False,
                logits_to_keep=t_len + 1)
    # logits at position i predict token i+1: the completion is predicted by positions p_len-1 .. end-1
    logits = out.logits[:, -(t_len + 1):-1, :]
    logprobs, entropy = selective_logprobs(logits, rollouts.completion_ids, rollouts.temperature,
                                           with_entropy)
    values = None
    if value_head is not None:
        hidden = out.hidden_states[-1][:, p_len - 1:-1, :]
        values = value_head(hidden.float())
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
    if not hasattr(model, "config") or isinstance(model, nn.parallel.DistributedDataParallel) or _is_sharded(model):
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


def _score_shared_prompts(model: nn.Module, rollouts: Any, first: torch.Tensor, rows: torch.Tensor,
                          value_head: nn.Module | None, with_entropy: bool) -> ForwardOut:
    """``score_completions`` with each distinct prompt run once and its keys/values repeated per row.

    Gradients flow through the repeated keys/values back into the one prompt pass (summed over its rows),
    so the update equals the one from scoring every row in full.
    """
    from rlctl.models.generation import new_cache, with_cache

    cache = new_cache(model)
    attention = rollouts.attention_mask
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    p_len = rollouts.prompt_ids.shape[1]
    want_hidden = value_head is not None
    prompt_out = model(input_ids=rollouts.prompt_ids[first], attention_mask=rollouts.prompt_mask[first],
                       position_ids=positions[first, :p_len], output_hidden_states=want_hidden,
                       logits_to_keep=1, **with_cache(model, cache))
    for layer in cache.layers:
        layer.keys = layer.keys.repeat_interleave(rows, dim=0)
        layer.values = layer.values.repeat_interleave(rows, dim=0)
    out = model(input_ids=rollouts.completion_ids, attention_mask=attention, position_ids=positions[:, p_len:],
                output_hidden_states=want_hidden, **with_cache(model, cache))
    # the first completion token is predicted by the prompt's last position, the others by the completion
    targets, temperature = rollouts.completion_ids, rollouts.temperature
    head = prompt_out.logits[:, -1:, :].repeat_interleave(rows, dim=0)  # [N, 1, V]: one position per row
    head_logp, head_ent = selective_logprobs(head, targets[:, :1], temperature, with_entropy)
    tail_logp, tail_ent = selective_logprobs(out.logits[:, :-1, :], targets[:, 1:], temperature, with_entropy)
    logprobs = torch.cat([head_logp, tail_logp], dim=1)
    entropy = torch.cat([head_ent, tail_ent], dim=1) if with_entropy else None
    values = None
    if value_head is not None:
        hidden = torch.cat([prompt_out.hidden_states[-1][:, -1:, :].repeat_interleave(rows, dim=0),
                            out.hidden_states[-1][:, :-1, :]], dim=1)
        values = value_head(hidden.float())
    return ForwardOut(logprobs=logprobs, entropy=entropy, values=values)
