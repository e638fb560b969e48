"""Models: loading policies through ``from_pretrained``, tiny offline models, value heads, log-probs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rlctl.errors import RecipeError

TINY_MARKER = "rlctl_tiny.json"
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Policy:
    """What a sampler receives: the (unwrapped) causal LM and its tokenizer."""

    model: Any
    tokenizer: Any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    return Path(os.environ.get("RLCTL_CACHE", Path.home() / ".cache" / "rlctl"))


# --------------------------------------------------------------------------------------------- tiny
def build_tokenizer() -> Any:
    """A character-level tokenizer over printable ASCII, built with ``tokenizers``."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    # BPE without merges splits text into single characters; Fuse joins them back without spaces
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk"]))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
    )


def tiny_spec(arch: str = "llama", hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
              num_kv_heads: int | None = None, intermediate_size: int | None = None,
              max_position_embeddings: int = 512, seed: int = 0) -> dict[str, Any]:
    if arch not in ("llama", "qwen2"):
        raise RecipeError(f"[model.tiny] arch = {arch!r}: accepted values are 'llama', 'qwen2'")
    return {
        "arch": arch,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads or num_heads,
        "intermediate_size": intermediate_size or 4 * hidden_size,
        "max_position_embeddings": max_position_embeddings,
        "seed": seed,
    }


def build_tiny_model(path: str | Path | None = None, **spec: Any) -> Path:
    """Build (once) a tiny random Llama/Qwen2 model + tokenizer and save it with ``save_pretrained``.

    Returns the directory, which loads with ``AutoModelForCausalLM.from_pretrained``. Without ``path``
    the model goes to the rlctl cache under a name derived from the spec. An existing directory is
    reused when its spec matches, and only ever replaced if it is a tiny model that rlctl built.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    full = tiny_spec(**spec)
    digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(path) if path else cache_dir() / "models" / f"tiny-{full['arch']}-{digest}"
    marker = out / TINY_MARKER
    if marker.exists() and json.loads(marker.read_text()) == full:
        return out
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise RecipeError(f"[model] name = {str(out)!r}: directory exists and is not a tiny rlctl model; "
                          "refusing to overwrite it")

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(
        full["arch"],
        vocab_size=len(tokenizer),
        hidden_size=full["hidden_size"],
        intermediate_size=full["intermediate_size"],
        num_hidden_layers=full["num_layers"],
        num_attention_heads=full["num_heads"],
        num_key_value_heads=full["num_kv_heads"],
        max_position_embeddings=full["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(full["seed"])
        model = AutoModelForCausalLM.from_config(config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / TINY_MARKER).write_text(json.dumps(full, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)  # atomic: a half-written model is never picked up
    return out


# ---------------------------------------------------------------------------------------- loading
def resolve_model_path(model_cfg: Any) -> str:
    """The name or directory to pass to ``from_pretrained`` (building a tiny model if asked)."""
    if model_cfg.tiny is not None:
        return str(build_tiny_model(model_cfg.name or None, **model_cfg.tiny))
    return model_cfg.name


def load_policy(model_cfg: Any) -> tuple[Any, Any]:
    """Load (model, tokenizer) for training. Weights only from safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rlctl shows its own progress
    name = resolve_model_path(model_cfg)
    common = {"trust_remote_code": model_cfg.trust_remote_code, "revision": model_cfg.revision}
    tokenizer = AutoTokenizer.from_pretrained(name, **common)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # prompts are left-padded so that generation continues them
    dtype = "auto" if model_cfg.dtype == "auto" else _DTYPES[model_cfg.dtype]
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True, **common)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` in eval mode (reference policies)."""
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class ValueHead(nn.Module):
    """A scalar value per position from the policy's last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).squeeze(-1)


# -------------------------------------------------------------------------------------- log-probs
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


def _prompt_groups(model: nn.Module, rollouts: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(first row, rows) of each run of rows with one prompt, when sharing the prompt is worth it and safe.

    Safe means a bare model (a DDP/FSDP wrapper expects one forward per backward), the cache-aware
    ``transformers`` forward (``past_key_values``), and no activation checkpointing (which turns the
    cache off in training).
    """
    if os.environ.get("RLCTL_SHARED_PROMPTS", "1") == "0":
        return None
    if not hasattr(model, "config") or isinstance(model, nn.parallel.DistributedDataParallel):
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
    from rlctl.generation import new_cache

    cache = new_cache(model)
    attention = rollouts.attention_mask
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    p_len = rollouts.prompt_ids.shape[1]
    want_hidden = value_head is not None
    prompt_out = model(input_ids=rollouts.prompt_ids[first], attention_mask=rollouts.prompt_mask[first],
                       position_ids=positions[first, :p_len], past_key_values=cache, use_cache=True,
                       output_hidden_states=want_hidden, logits_to_keep=1)
    for layer in cache.layers:
        layer.keys = layer.keys.repeat_interleave(rows, dim=0)
        layer.values = layer.values.repeat_interleave(rows, dim=0)
    out = model(input_ids=rollouts.completion_ids, attention_mask=attention, position_ids=positions[:, p_len:],
                past_key_values=cache, use_cache=True, output_hidden_states=want_hidden)
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
