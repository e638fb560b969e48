"""Models: loading policies through ``from_pretrained``, tiny offline models, value heads, log-probs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not marker.exists():
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
    from rlctl import rundir

    tmp = rundir.temp_dir(out.parent)  # fresh and unique: no sibling of the user's is touched
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / TINY_MARKER).write_text(json.dumps(full, sort_keys=True))
        _replace_tiny_model(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_tiny_model(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is replaced only if it is a tiny model rlctl built."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RecipeError(f"[model] name = {str(out)!r}: exists and is not a directory; refusing to replace it")
    if out.is_dir():
        if (out / TINY_MARKER).is_file():
            old = Path(tempfile.mkdtemp(prefix=".rlctl-tmp-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
            return
        if any(out.iterdir()):
            raise RecipeError(f"[model] name = {str(out)!r}: directory exists and is not a tiny rlctl model; "
                              "refusing to overwrite it")
        out.rmdir()  # empty
    tmp.rename(out)  # atomic: a half-written model is never picked up


# ---------------------------------------------------------------------------------------- loading
def resolve_model_path(model_cfg: Any) -> str:
    """The name or directory to pass to ``from_pretrained`` (building a tiny model or converting a GGUF
    file if asked). A name that looks like a path must be an existing directory."""
    if model_cfg.tiny is not None:
        return str(build_tiny_model(model_cfg.name or None, **model_cfg.tiny))
    if getattr(model_cfg, "gguf_file", None):
        from rlctl.model_import import import_gguf, require_gguf, resolve_gguf

        require_gguf()
        gguf = model_cfg.gguf_file
        if model_cfg.name and Path(model_cfg.name).expanduser().is_dir():
            gguf = str(Path(model_cfg.name).expanduser() / gguf)
        elif model_cfg.name:  # a hub repository: transformers downloads the file (online only)
            return model_cfg.name
        return str(import_gguf(resolve_gguf(gguf)))
    name = model_cfg.name
    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise RecipeError(f"[model] name = {name!r}: not a directory; give the directory that holds "
                          "config.json (or gguf_file for a .gguf file)")
    if not local.exists() and _looks_like_path(name):
        raise RecipeError(f"[model] name = {name!r}: no such directory; give an existing model directory "
                          "or a hub name such as 'HuggingFaceTB/SmolLM2-135M-Instruct'")
    return str(local) if local.exists() else name


def _looks_like_path(name: str) -> bool:
    """Hub names are 'model' or 'org/model'; anything else is meant as a local path."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or name.endswith("/"))


def load_policy(model_cfg: Any) -> tuple[Any, Any]:
    """Load (model, tokenizer) for training. Weights only from safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # rlctl shows its own progress
    name = resolve_model_path(model_cfg)
    common = {"trust_remote_code": model_cfg.trust_remote_code, "revision": model_cfg.revision}
    if getattr(model_cfg, "gguf_file", None) and not Path(name).is_dir():
        common["gguf_file"] = model_cfg.gguf_file  # from a hub repository
    if not Path(name).is_dir() and not _in_hub_cache(name, common) and not _hub_reachable():
        raise RecipeError(f"[model] name = {name!r}: not a local directory, not in the Hugging Face cache, "
                          "and no network reached the Hub to fetch it. On a machine with network run "
                          f"`huggingface-cli download {name} --local-dir DIR`, copy DIR here and set "
                          "[model] name = \"DIR\"")
    with _hub_errors(name):
        tokenizer = AutoTokenizer.from_pretrained(name, **common)
        dtype = "auto" if model_cfg.dtype == "auto" else _DTYPES[model_cfg.dtype]
        weights = {} if "gguf_file" in common else {"use_safetensors": True}
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **weights, **common)
    check_special_tokens(tokenizer, name)
    tokenizer.padding_side = "left"  # prompts are left-padded so that generation continues them
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _in_hub_cache(name: str, common: dict[str, Any]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, common.get("gguf_file") or "config.json",
                                       revision=common.get("revision"))
        return isinstance(found, str)
    except Exception:  # an invalid repository id, or an older huggingface_hub
        return False


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hub's host answers at all (a machine without network fails at once, not after retries)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
    except Exception:
        return True  # cannot tell: let transformers try
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def check_special_tokens(tokenizer: Any, name: str) -> None:
    """Completions end at EOS and batches are padded: a tokenizer needs an EOS, and a pad token (the
    EOS when it has none; the completion mask ends at the first EOS, so padding with it is safe)."""
    if tokenizer.eos_token_id is None:
        raise RecipeError(f"[model] name = {name!r}: the tokenizer has no EOS token, so completions cannot "
                          "end; use a tokenizer with an eos_token (set it in tokenizer_config.json)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def check_chat_template(tokenizer: Any, name: str, where: str) -> None:
    """A sampler asked for ``chat_template = true``: the tokenizer must have one."""
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError(f"{where} chat_template = true: the tokenizer of [model] name = {name!r} has no chat "
                          "template; set chat_template = false (plain prompts) or use an instruct model")


class _hub_errors:
    """transformers' errors for a model that cannot be found or fetched, as one line naming the key."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, OSError):
            return False
        name = self.name
        if Path(name).expanduser().is_dir():
            raise RecipeError(f"[model] name = {name!r}: the directory is not a loadable model "
                              f"({_first_line(exc)})") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        reason = ("HF_HUB_OFFLINE is set" if offline else
                  "the Hugging Face Hub could not be reached or has no such model")
        raise RecipeError(f"[model] name = {name!r}: not a local directory, and it could not be fetched ({reason}); "
                          "no model was downloaded. On a machine with network run `huggingface-cli download "
                          f"{name} --local-dir DIR` and set [model] name = \"DIR\"") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


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
    ``transformers`` forward (a cache argument), and no activation checkpointing (which turns the
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
    from rlctl.generation import new_cache, with_cache

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
