"""The policy's weights as one safetensors file on tmpfs, for an engine to load (see ``worker.py``)."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from rlctl.train.weight_sync import policy_tensors, shared_memory_dir


def weights_version(model: torch.nn.Module) -> int:
    """Sum of the in-place version counters of the trainable parameters: changes with every optimizer step."""
    return sum(p._version for p in model.parameters() if p.requires_grad)


@contextmanager
def weights_file(model: torch.nn.Module) -> Iterator[Path]:
    """Write every parameter (tied ones once, as ``named_parameters`` lists them; a LoRA policy's with its
    adapters merged, under the base model's names); removed afterwards."""
    from safetensors.torch import save_file

    fd, name = tempfile.mkstemp(prefix="rlctl-weights-", suffix=".safetensors", dir=shared_memory_dir())
    os.close(fd)
    path = Path(name)
    try:
        save_file(policy_tensors(model), str(path))
        yield path
    finally:
        path.unlink(missing_ok=True)
