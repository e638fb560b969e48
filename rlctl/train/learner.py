"""The learner: from a scored batch to optimizer steps.

Old and reference log-probs and values as the components require, advantages (computed on the batch of
all processes), then ``ppo_epochs`` passes of ``mini_batches`` optimizer steps, each accumulated over
micro-batches of whole groups, with gradient clipping and a finite check.

The gradient of a step does not depend on how its mini-batch is split into micro-batches or across
processes: every micro-batch sees ``rollouts.totals``, the loss's counts over the whole mini-batch of all
processes, so its loss is its share of the mini-batch loss, and the shares add up. Gradients are averaged
over processes (DDP), hence the factor ``num_processes`` on every backward.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable

import torch

from rlctl.components import requirements
from rlctl.errors import RlctlError
from rlctl.models import ForwardOut, ValueHead, score_completions
from rlctl.ops import default_totals
from rlctl.recipe import ComponentSpec, Stage
from rlctl.rollouts import Rollouts
from rlctl.train.components import guarded
from rlctl.train.engine import Engine, gather_rollouts
from rlctl.train.parity import Parity
from rlctl.train.reference import Reference


class Learner:
    def __init__(self, engine: Engine, model: torch.nn.Module, reference: Reference, pad_token_id: int, seed: int):
        self.engine = engine
        self.model = model  # as prepared by the engine (wrapped under DDP)
        self.reference = reference
        self.pad_token_id = pad_token_id
        self.value_head: torch.nn.Module | None = None
        self.optimizer: Any = None
        self.rng = torch.Generator().manual_seed(seed)  # mini-batch shuffling
        self.version = 0  # optimizer steps taken: the policy version

    @property
    def policy(self) -> torch.nn.Module:
        return self.engine.unwrap(self.model)

    @property
    def trainable(self) -> torch.nn.Module:
        """Everything the optimizer updates, as one module (the policy, and the value head if any)."""
        if self.value_head is None:
            return self.model
        return torch.nn.ModuleDict({"policy": self.model, "value_head": self.value_head})

    @property
    def unwrapped_value_head(self) -> ValueHead | None:
        return None if self.value_head is None else self.engine.unwrap(self.value_head)

    def start_stage(self, stage: Stage, needs: set[str]) -> None:
        """A value head (once, if the stage needs values) and a fresh optimizer for the stage."""
        if "values" in needs and self.value_head is None:
            hidden = self.policy.config.get_text_config().hidden_size
            self.value_head = self.engine.prepare_model(ValueHead(hidden).to(self.engine.device))

    def new_optimizer(self, stage: Stage) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters only
        params += list(self.value_head.parameters()) if self.value_head else []
        optimizer = torch.optim.AdamW(params, lr=stage.train.lr, betas=tuple(stage.train.adam_betas),
                                      weight_decay=stage.train.weight_decay)
        self.optimizer = self.engine.prepare_optimizer(optimizer)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ------------------------------------------------------------------------------------ a step
    def learn(self, rollouts: Rollouts, built: dict[str, Any], specs: dict[str, Any], needs: set[str],
              t: Any, metrics: dict[str, Any]) -> dict[str, float]:
        """Old/reference log-probs and values as required, advantages, then the optimizer updates."""
        # With one pass over one mini-batch the weights that score the batch are the ones that sampled
        # it, so the update's own forward gives the old log-probs (no extra pass) unless the advantage
        # estimator needs them before the update.
        advantage_needs_old = "old_logprobs" in requirements(built.get("advantage")) and "advantages" in needs
        on_policy_single_pass = t.ppo_epochs == 1 and t.mini_batches == 1 and not advantage_needs_old
        with torch.no_grad():
            if "values" in needs or ("old_logprobs" in needs and not on_policy_single_pass):
                old = self.forward(rollouts, grad=False, values="values" in needs)
                if "old_logprobs" in needs:
                    rollouts.old_logprobs = old.logprobs
                rollouts.values = old.values
            if self.reference.in_use:
                rollouts.ref_logprobs = self.reference.logprobs(rollouts)
        parity = Parity() if rollouts.behavior_logprobs is not None else None
        if parity is not None and rollouts.old_logprobs is not None:  # scored with the sampling weights
            parity.add(rollouts.old_logprobs, rollouts.behavior_logprobs, rollouts.completion_mask)
        if "advantages" in needs:
            rollouts.advantages = self.advantages(rollouts, built["advantage"], specs["advantage"])
            metrics.update(getattr(built["advantage"], "last_stats", None) or {})  # e.g. a KL in the reward
        stats = self.update(rollouts, built["loss"], specs["loss"], needs, t, on_policy_single_pass, parity)
        return {**stats, **(parity.metrics() if parity is not None else {})}

    def advantages(self, rollouts: Rollouts, advantage: Any, spec: ComponentSpec) -> torch.Tensor:
        """Advantages computed on the batch of all processes, so they never depend on the split."""
        if self.engine.num_processes == 1:
            return guarded(spec, "advantage", advantage.compute, rollouts)
        whole, mine = gather_rollouts(self.engine, rollouts, self.pad_token_id)
        values = guarded(spec, "advantage", advantage.compute, whole)
        if whole.returns is not None:
            rollouts.returns = whole.returns[mine, : rollouts.completion_ids.shape[1]]
        return values[mine, : rollouts.completion_ids.shape[1]]

    def forward(self, rollouts: Rollouts, grad: bool, values: bool = False, entropy: bool = False) -> ForwardOut:
        ctx = nullcontext() if grad else torch.no_grad()
        with ctx, self.engine.autocast():
            return score_completions(self.model, rollouts, self.value_head if values else None, entropy)

    def update(self, rollouts: Rollouts, loss_fn: Any, spec: ComponentSpec, needs: set[str], t: Any,
               on_policy_single_pass: bool, parity: Parity | None = None) -> dict[str, float]:
        """Optimizer steps over mini-batches, each accumulated over micro-batches.

        ``parity``, when the batch has behaviour log-probs and no earlier pass scored it, is fed the
        first mini-batch's log-probs: the only ones computed with the weights that sampled it.
        """
        parity = parity if parity is not None and parity.tokens == 0 else None
        stats_sum: dict[str, float] = {}
        loss_sum, micro_count, steps, skipped, norm_sum = 0.0, 0, 0, 0, 0.0
        world = self.engine.num_processes
        for _ in range(t.ppo_epochs):
            for mb_index in group_batches(rollouts.group_ids, t.mini_batches, self.rng):
                mini = rollouts.select(mb_index)
                totals = self.totals(loss_fn, spec, mini)
                chunks = micro_batches(mini.group_ids, t.micro_batch_size)
                for ci, chunk in enumerate(chunks):
                    micro = mini.select(chunk)
                    micro.totals = totals
                    sync = self.engine.no_sync(self.model) if ci < len(chunks) - 1 else nullcontext()
                    with sync:
                        out = self.forward(micro, grad=True, values="values" in needs, entropy="entropy" in needs)
                        if on_policy_single_pass and "old_logprobs" in needs:
                            micro.old_logprobs = out.logprobs.detach()  # same weights: no second forward
                        if parity is not None and steps == 0:
                            parity.add(out.logprobs, micro.behavior_logprobs, micro.completion_mask)
                        extra = {}
                        if out.entropy is not None:
                            extra["entropy"] = out.entropy
                        if out.values is not None:
                            extra["values"] = out.values
                        loss, stats = guarded(spec, "loss", loss_fn.compute, micro, out.logprobs, **extra)
                        self.engine.backward(loss * world)
                    loss_sum += float(loss.item()) * world
                    for k, v in stats.items():
                        stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
                    micro_count += 1
                grad_norm = self.clip(t.max_grad_norm)
                if math.isfinite(grad_norm):
                    self.optimizer.step()
                    self.version += 1
                else:
                    skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                steps += 1
                norm_sum += grad_norm
        out_stats = {k: v / max(micro_count, 1) for k, v in stats_sum.items()}
        out_stats["loss"] = loss_sum / max(steps, 1)  # the mean over optimizer steps of the mini-batch loss
        out_stats["grad_norm"] = norm_sum / max(steps, 1)
        if skipped:
            out_stats["skipped_updates"] = float(skipped)
        return out_stats

    def totals(self, loss_fn: Any, spec: ComponentSpec, mini: Rollouts) -> dict[str, float]:
        """The loss's counts (``rollouts.totals``) over ``mini``, summed over all processes."""
        totals = default_totals(mini)
        if hasattr(loss_fn, "totals"):
            totals.update(guarded(spec, "loss", loss_fn.totals, mini))
        return self.engine.sum_counts(totals)

    def clip(self, max_norm: float) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        return self.engine.clip_grad_norm(params, max_norm)


class BadSteps:
    """Consecutive steps whose update was skipped for a non-finite loss or gradient; the run stops (with
    a checkpoint) after ``[train] max_bad_steps`` of them."""

    def __init__(self, limit: int, warn: Callable[[str], None]):
        self.limit = limit
        self.warn = warn
        self.in_a_row = 0

    def count(self, metrics: dict[str, Any]) -> bool:
        """Count this step's outcome; True when the run must stop."""
        if not metrics.get("skipped_updates"):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.warn(f"warning: step {metrics['step']}: non-finite loss or gradient, update skipped "
                  f"({self.in_a_row} in a row)")
        return self.in_a_row >= self.limit

    def abort(self, checkpoint: Any) -> RlctlError:
        return RlctlError(f"aborting: {self.in_a_row} consecutive steps with a non-finite loss or gradient "
                          f"([train] max_bad_steps = {self.limit}); checkpoint written to {checkpoint}. Lower "
                          "the learning rate or check the rewards, then resume with --resume latest")


def group_batches(group_ids: torch.Tensor, parts: int, rng: torch.Generator) -> list[torch.Tensor]:
    """Shuffle whole groups and split them into ``parts`` mini-batches of sample indices.

    Groups are never split, so that losses comparing completions of one prompt (DPO pairs,
    group-normalised terms) always see the whole group.
    """
    groups = torch.unique(group_ids)
    order = groups[torch.randperm(len(groups), generator=rng)]
    return [torch.isin(group_ids, chunk).nonzero().flatten() for chunk in order.tensor_split(parts)
            if len(chunk)]


def micro_batches(group_ids: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Consecutive whole groups of about ``size`` samples each (0: one micro-batch)."""
    if size <= 0 or size >= len(group_ids):
        return [torch.arange(len(group_ids))]
    batches, current, count = [], [], 0
    for g in torch.unique(group_ids, sorted=False).tolist():
        idx = (group_ids == g).nonzero().flatten()
        if current and count + len(idx) > size:
            batches.append(torch.cat(current))
            current, count = [], 0
        current.append(idx)
        count += len(idx)
    if current:
        batches.append(torch.cat(current))
    return batches
