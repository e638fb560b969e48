"""Tiny random models for offline use: a character-level tokenizer and a small Llama/Qwen2 saved once."""

from __future__ import annotations

import hashlib
import json
import shutil
import string
from pathlib import Path
from typing import Any

import torch

from rlctl.errors import RecipeError
from rlctl.models.cache_lock import fresh_dir, lock_path, locked, remove_stale, save_model_here
from rlctl.models.policy import cache_dir

TINY_MARKER = "rlctl_tiny.json"
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


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
    Several processes that ask at once (the ranks of a run) build it once, under a file lock, into a
    temporary directory renamed into place: none of them sees a half-written model.
    """
    full = tiny_spec(**spec)
    digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(path) if path else cache_dir() / "models" / f"tiny-{full['arch']}-{digest}"
    if _built_spec(out) == full:
        return out
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(lock_path(out)):
        if _built_spec(out) == full:  # another process built it while this one waited
            return out
        _check_replaceable(out)
        remove_stale(out)  # a builder killed half-way (only the lock holder builds)
        tmp = fresh_dir(out)
        try:
            _write_tiny_model(tmp, full)
            _replace_tiny_model(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _built_spec(out: Path) -> dict[str, Any] | None:
    """The spec recorded by the tiny model at ``out`` (None if there is none, or an unreadable one)."""
    try:
        return json.loads((out / TINY_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / TINY_MARKER).is_file():
        raise RecipeError(f"[model] name = {str(out)!r}: directory exists and is not a tiny rlctl model; "
                          "refusing to overwrite it")


def _write_tiny_model(tmp: Path, full: dict[str, Any]) -> None:
    """The model, its tokenizer and, last, the marker holding the spec."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
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
    save_model_here(model, tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / TINY_MARKER).write_text(json.dumps(full, sort_keys=True))


def _replace_tiny_model(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is replaced only if it is a tiny model rlctl built."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RecipeError(f"[model] name = {str(out)!r}: exists and is not a directory; refusing to replace it")
    if out.is_dir():
        if (out / TINY_MARKER).is_file():
            old = fresh_dir(out)
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
            return
        if any(out.iterdir()):
            raise RecipeError(f"[model] name = {str(out)!r}: directory exists and is not a tiny rlctl model; "
                              "refusing to overwrite it")
        out.rmdir()  # empty
    tmp.rename(out)  # atomic: a half-written model is never picked up
