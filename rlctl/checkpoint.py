"""Checkpoints: everything needed to continue a run exactly, written atomically.

Layout of ``RUN/checkpoints/step-000012/`` (the number is the count of completed steps):

    policy/                    model + tokenizer (save_pretrained, safetensors)
    value_head.safetensors     when the policy has a value head
    reference.safetensors      the frozen reference policy's weights, when one is in use
    optimizer.pt               optimizer state (tensors only; loaded with weights_only=True)
    rng.pt                     torch CPU (and CUDA) RNG states and the mini-batch shuffling generator
    state.json                 step, stage, data position, python/numpy RNG, component states

A checkpoint is written to ``step-N.tmp`` and renamed when complete, so a crash mid-write never leaves a
checkpoint that looks valid. Only the newest ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlctl.errors import RlctlError

PREFIX = "step-"


@dataclass
class Snapshot:
    """What the trainer hands over to be saved (and gets back on resume)."""

    step: int
    stage_index: int
    stage_step: int
    data_state: dict[str, int]
    component_states: dict[str, Any]  # "sampler", "reward[0]", ... -> state_dict()
    eval_results: dict[str, dict[str, float]]
    consecutive_bad_steps: int = 0


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """``latest`` (newest checkpoint of ``run_dir``), a checkpoint directory, or a run directory."""
    if resume == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise RlctlError(f"--resume latest: no checkpoint in {checkpoint_dir(run_dir)}")
        return found[-1]
    path = Path(resume)
    if (path / "state.json").exists():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise RlctlError(f"--resume {resume}: not a checkpoint (no state.json) nor a run directory with checkpoints")


def save_checkpoint(run_dir: Path, snap: Snapshot, *, model: Any, tokenizer: Any, optimizer: Any,
                    generator: torch.Generator, value_head: Any = None, reference: Any = None,
                    keep: int = 2) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{snap.step:06d}"
    tmp = root / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp / "policy", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "policy")
    from safetensors.torch import save_model  # handles tied (shared) weights

    if value_head is not None:
        save_model(value_head, str(tmp / "value_head.safetensors"))
    if reference is not None:
        save_model(reference, str(tmp / "reference.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / "rng.pt")
    np_state = np.random.get_state()
    state = {
        "step": snap.step,
        "stage_index": snap.stage_index,
        "stage_step": snap.stage_step,
        "data": snap.data_state,
        "components": snap.component_states,
        "eval_results": snap.eval_results,
        "consecutive_bad_steps": snap.consecutive_bad_steps,
        "python_random": _to_json(random.getstate()),
        "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    (tmp / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # the checkpoint exists only once complete
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


def restore_rng(path: Path, state: dict[str, Any], generator: torch.Generator) -> None:
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["generator"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(_from_json(state["python_random"]))
    kind, keys, pos, has_gauss, gauss = state["numpy_random"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def load_weights(module: Any, file: Path) -> None:
    from safetensors.torch import load_model

    load_model(module, str(file))


def load_optimizer(optimizer: Any, path: Path) -> None:
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))


def _to_json(value: Any) -> Any:
    return [_to_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def _from_json(value: Any) -> Any:
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value
