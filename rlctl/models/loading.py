"""Loading a policy with ``from_pretrained``: where the model comes from, one-line errors, token checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rlctl.errors import RecipeError
from rlctl.models.tiny import build_tiny_model

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model_cfg: Any) -> str:
    """The name or directory to pass to ``from_pretrained`` (building a tiny model or converting a GGUF
    file if asked). A name that looks like a path must be an existing directory."""
    if model_cfg.tiny is not None:
        return str(build_tiny_model(model_cfg.name or None, **model_cfg.tiny))
    if getattr(model_cfg, "gguf_file", None):
        from rlctl.models.gguf import import_gguf, require_gguf, resolve_gguf

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

    if _offline():
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
        reason = ("HF_HUB_OFFLINE is set" if _offline() else
                  "the Hugging Face Hub could not be reached or has no such model")
        raise RecipeError(f"[model] name = {name!r}: not a local directory, and it could not be fetched ({reason}); "
                          "no model was downloaded. On a machine with network run `huggingface-cli download "
                          f"{name} --local-dir DIR` and set [model] name = \"DIR\"") from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
