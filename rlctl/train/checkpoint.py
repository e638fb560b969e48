"""Checkpoints: everything needed to continue a run exactly, written atomically.

Layout of ``RUN/checkpoints/step-000012/`` (the number is the count of completed steps):

    policy/                    model + tokenizer (save_pretrained, safetensors)
    rollouts.pt                asynchronous rollouts: requests sent and batches returned, not yet learned from
    value_head.safetensors     when the policy has a value head
    reference.safetensors      the frozen reference policy's weights, when one is in use
    optimizer.pt               optimizer state (tensors only; loaded with weights_only=True), or
    optimizer/                 with the fsdp2 engine: its shards (torch.distributed.checkpoint)
    rank-0.pt, rank-1.pt ...   per process: torch/CUDA/python/numpy RNG states, the mini-batch shuffling
                               generator and the components' states (loaded with weights_only=True)
    state.json                 step, stage, data position, evaluation results

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
    eval_results: dict[str, dict[str, float]]
    process_states: list[dict[str, Any]]  # one per process, from ``process_state()``
    consecutive_bad_steps: int = 0


def process_state(generator: torch.Generator, component_states: dict[str, Any]) -> dict[str, Any]:
    """This process's RNG states and component states (``"sampler"``, ``"reward[0]"`` ... -> state)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python_random": _to_json(random.getstate()),
        "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "components": component_states,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


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


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """The empty directory a checkpoint of ``step`` is written into before it is renamed into place."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = pending_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def pending_dir(run_dir: Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"{PREFIX}{step:06d}.tmp"


def save_checkpoint(run_dir: Path, snap: Snapshot, *, model: Any, tokenizer: Any, model_state: Any = None,
                    value_head: Any = None, reference: Any = None, keep: int = 2) -> Path:
    """Complete the checkpoint begun by ``begin_checkpoint`` (the optimizer state is already in it) and
    rename it into place. ``model_state``: the policy's full state dict when it is sharded (else read
    from ``model``); ``value_head`` and ``reference``: modules or full state dicts."""
    tmp = pending_dir(run_dir, snap.step)
    final = checkpoint_dir(run_dir) / f"{PREFIX}{snap.step:06d}"
    model.save_pretrained(tmp / "policy", safe_serialization=True, state_dict=model_state)
    tokenizer.save_pretrained(tmp / "policy")
    for name, part in (("value_head", value_head), ("reference", reference)):
        if part is not None:
            _save_weights(part, tmp / f"{name}.safetensors")
    for rank, local in enumerate(snap.process_states):
        torch.save(local, tmp / f"rank-{rank}.pt")
    state = {
        "step": snap.step,
        "stage_index": snap.stage_index,
        "stage_step": snap.stage_step,
        "data": snap.data_state,
        "eval_results": snap.eval_results,
        "consecutive_bad_steps": snap.consecutive_bad_steps,
        "processes": len(snap.process_states),
    }
    (tmp / "state.json").write_text(json.dumps(state))
    if is_checkpoint(final):  # the same step written again (after a resume): replace it
        shutil.rmtree(final)
    tmp.rename(final)  # the checkpoint exists only once complete
    ours = [c for c in list_checkpoints(run_dir) if is_checkpoint(c)]  # only what rlctl recognises is pruned
    for old in ours[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def _save_weights(part: Any, file: Path) -> None:
    from safetensors.torch import save_file, save_model  # save_model handles tied (shared) weights

    if isinstance(part, dict):
        save_file({k: v.clone().contiguous() for k, v in part.items()}, str(file))  # tied weights: apart
    else:
        save_model(part, str(file))


def is_checkpoint(path: Path) -> bool:
    """A complete checkpoint written by rlctl: a real directory ``step-N`` holding its ``state.json``."""
    name = path.name
    return (name.startswith(PREFIX) and name[len(PREFIX):].isdigit() and not path.is_symlink()
            and path.is_dir() and (path / "state.json").is_file() and not (path / "state.json").is_symlink())


def load_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "state.json").read_text())


def load_process_state(path: Path, rank: int, processes: int) -> dict[str, Any]:
    """This process's saved states; the number of processes must match the saved run's."""
    if processes != len(list(path.glob("rank-*.pt"))):
        raise RlctlError(f"checkpoint {path} was written by {len(list(path.glob('rank-*.pt')))} process(es); "
                         f"resume it with the same number (now {processes})")
    return torch.load(path / f"rank-{rank}.pt", weights_only=True)


def restore_rng(local: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(local["torch"])
    generator.set_state(local["generator"])
    if "cuda" in local and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(local["cuda"])
    random.setstate(_from_json(local["python_random"]))
    kind, keys, pos, has_gauss, gauss = local["numpy_random"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _to_json(value: Any) -> Any:
    return [_to_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def _from_json(value: Any) -> Any:
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value
