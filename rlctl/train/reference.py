"""The reference policy of KL terms and preference losses: a frozen copy of the policy (at the start of
the stage, or of the run with ``[train] reference = "initial"``), or, with LoRA, the policy itself with
its adapters switched off (no second copy of the weights). Log-probs of completions that depend only on
the prompt (a ``deterministic`` sampler) are computed once per stage and reused."""

from __future__ import annotations

from typing import Any

import torch

from rlctl.models import score_completions
from rlctl.lora import adapters_disabled, is_lora
from rlctl.rollouts import Rollouts
from rlctl.train.engine import Engine


class Reference:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.model: torch.nn.Module | None = None  # a frozen copy (None with LoRA: adapters off)
        self.initial: torch.nn.Module | None = None  # frozen at the start of the run, when asked for
        self.in_use = False
        self.policy: torch.nn.Module | None = None
        self._cache: dict[tuple[str, str], torch.Tensor] | None = None

    def start_stage(self, policy: torch.nn.Module, needed: bool, kind: str, deterministic: bool) -> None:
        """Choose the stage's reference: ``kind`` is ``[train] reference`` ("stage_start" or "initial")."""
        self.policy = policy
        self.model = None
        if needed and not is_lora(policy):
            self.model = self.initial if kind == "initial" else self.engine.frozen_copy(policy)
        self.in_use = needed
        # completions that depend only on the prompt (demonstrations, preference pairs) meet the same
        # frozen reference again every epoch: score each once per stage (not with a sharded reference,
        # whose every forward needs all processes)
        self._cache = {} if needed and deterministic and not self.engine.sharded else None

    def logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        """Reference log-probs; cached per (prompt, completion) when the sampler is deterministic."""
        if self._cache is None:
            return self.score(rollouts)
        keys = list(zip(rollouts.prompts, rollouts.completions))
        missing = [i for i, key in enumerate(keys) if key not in self._cache]
        if missing:
            fresh = self.score(rollouts.select(missing))
            for row, i in enumerate(missing):
                length = int(rollouts.completion_mask[i].sum())
                self._cache[keys[i]] = fresh[row, :length].cpu()
        out = torch.zeros(rollouts.completion_ids.shape, dtype=torch.float32)
        for i, key in enumerate(keys):
            cached = self._cache[key]
            out[i, : len(cached)] = cached
        return out.to(rollouts.completion_ids.device)

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        if self.model is None:  # LoRA: the base model is the policy with its adapters switched off
            with adapters_disabled(self.policy), self.engine.autocast():
                return score_completions(self.policy, rollouts).logprobs
        with self.engine.autocast():
            return score_completions(self.model, rollouts).logprobs

    def freeze_initial(self, model: Any, loaded_apart: bool = False) -> None:
        """Keep ``model``'s weights as the run's initial reference. ``loaded_apart``: ``model`` was loaded
        for this purpose (on resume), so it is frozen itself (sharded first when the engine shards)."""
        if not loaded_apart:
            self.initial = self.engine.frozen_copy(model)
            return
        model = self.engine.prepare_model(model) if self.engine.sharded else model
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.initial = model
