"""The policy's weights as one safetensors file on tmpfs, for an engine to load (see ``worker.py``)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


def weights_version(model: torch.nn.Module) -> int:
    """Sum of the in-place version counters of the trainable parameters: changes with every optimizer step."""
    return sum(p._version for p in model.parameters() if p.requires_grad)


def shared_memory_dir() -> Path:
    """``/dev/shm`` (RAM, no disk writes) where it exists, else the temporary directory."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


@contextmanager
def weights_file(model: torch.nn.Module) -> Iterator[Path]:
    """Write every parameter (tied ones once, as ``named_parameters`` lists them; a LoRA policy's with its
    adapters merged, under the base model's names); removed afterwards."""
    from safetensors.torch import save_file

    fd, name = tempfile.mkstemp(prefix="rlctl-weights-", suffix=".safetensors", dir=shared_memory_dir())
    os.close(fd)
    path = Path(name)
    try:
        from rlctl.models.lora import is_lora, merged_parameters

        named = merged_parameters(model) if is_lora(model) else dict(model.named_parameters())
        tensors = {n: p.detach().to("cpu").contiguous() for n, p in named.items()}
        save_file(tensors, str(path))
        yield path
    finally:
        path.unlink(missing_ok=True)
