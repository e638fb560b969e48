"""The checkpointer: what a checkpoint of a run holds and how a run continues from one.

A checkpoint (``rlctl.train.checkpoint`` writes the files atomically) holds the policy, the optimizer, the
value head and the stage's reference when in use, every process's RNG and component states, the data
position, the evaluation results so far and the count of consecutive bad steps. Resuming mid-stage
restores all of it, so that a resumed run continues exactly like the uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rlctl.train import components
from rlctl.train.checkpoint import (PREFIX, Snapshot, begin_checkpoint, checkpoint_dir, load_process_state,
                                    load_state, pending_dir, process_state, resolve_resume,
                                    restore_rng, save_checkpoint)
from rlctl.train.engine import Engine
from rlctl.train.learner import Learner
from rlctl.train.reference import Reference

ROLLOUTS_FILE = "rollouts.pt"  # asynchronous rollouts: requests sent and batches returned, not yet learned from


class Checkpointer:
    def __init__(self, engine: Engine, run_dir: Path, keep: int):
        self.engine = engine
        self.run_dir = run_dir
        self.keep = keep
        self.checkpoint: Path | None = None  # the one a run resumes from
        self.resumed: dict[str, Any] = {}
        self.resumed_rollouts: dict[str, Any] | None = None  # an asynchronous source's requests in flight

    def open_resume(self, resume: str) -> dict[str, Any]:
        """Find the checkpoint to resume from (``latest``, a checkpoint or a run directory)."""
        self.checkpoint = resolve_resume(self.run_dir, resume)
        self.resumed = load_state(self.checkpoint)
        if (self.checkpoint / ROLLOUTS_FILE).exists():
            self.resumed_rollouts = torch.load(self.checkpoint / ROLLOUTS_FILE, weights_only=True)
        return self.resumed

    def save(self, *, step: int, stage_index: int, stage_step: int, data_state: dict[str, int],
             eval_results: dict[str, Any], bad_steps: int, learner: Learner, tokenizer: Any,
             reference: Any, built: dict[str, Any], rollout_state: dict[str, Any] | None = None) -> Path | None:
        """Write a checkpoint (the main process writes; every process contributes its states);
        ``rollout_state``: an asynchronous source's requests and batches not yet learned from."""
        local = process_state(learner.rng, components.states(built))
        snap = Snapshot(step=step, stage_index=stage_index, stage_step=stage_step, data_state=data_state,
                        eval_results=eval_results, process_states=self.engine.gather_objects(local),
                        consecutive_bad_steps=bad_steps)
        engine, head = self.engine, learner.value_head
        # sharded modules are gathered by every process (collectives); the main process writes them
        policy_state = engine.saved_state(learner.policy)
        head = engine.saveable(head) if head is not None else None
        reference = engine.saveable(reference) if reference is not None else None
        if engine.is_main:
            pending = begin_checkpoint(self.run_dir, step)
            if rollout_state is not None:
                torch.save(rollout_state, pending / ROLLOUTS_FILE)
        engine.barrier()
        engine.save_optimizer(learner.trainable, learner.optimizer, pending_dir(self.run_dir, step))
        engine.barrier()
        path = checkpoint_dir(self.run_dir) / f"{PREFIX}{step:06d}"  # where it ends up, on every process
        if engine.is_main:  # one writer
            save_checkpoint(self.run_dir, snap, model=learner.policy, tokenizer=tokenizer, model_state=policy_state,
                            value_head=head, reference=reference, keep=self.keep)
        engine.barrier()
        return path

    def restore_stage(self, learner: Learner, reference: Reference, built: dict[str, Any]) -> None:
        """Mid-stage: the stage's optimizer, value head, reference, component states and RNG continue."""
        path = self.checkpoint
        if learner.value_head is not None and (path / "value_head.safetensors").exists():
            self.engine.load_weights(learner.value_head, path / "value_head.safetensors")
        if reference.model is not None and (path / "reference.safetensors").exists():
            self.engine.load_weights(reference.model, path / "reference.safetensors")
        self.engine.load_optimizer(learner.trainable, learner.optimizer, path)
        local = self._local()
        components.load_states(built, local["components"])
        restore_rng(local, learner.rng)

    def restore_rng(self, learner: Learner) -> None:
        """At a stage boundary only the RNG states continue."""
        restore_rng(self._local(), learner.rng)

    def _local(self) -> dict[str, Any]:
        return load_process_state(self.checkpoint, self.engine.process_index, self.engine.num_processes)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint at ``step`` (they will be produced again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines(keepends=True) if line.strip() and (
        json.loads(line)["step"] < step or ("eval" in json.loads(line) and json.loads(line)["step"] <= step))]
    path.write_text("".join(keep))
