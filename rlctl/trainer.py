"""The training loop: sample -> reward -> advantage -> loss -> optimizer step, stage after stage.

No algorithm lives here: what gets computed is decided by the components' ``requires`` declarations
(see ``rlctl.components``), never by their names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from rlctl import plugins, rundir
from rlctl.checkpoint import (Snapshot, load_optimizer, load_process_state, load_state, load_weights,
                              process_state, resolve_resume, restore_rng, save_checkpoint)
from rlctl.components import requirements, stage_needs
from rlctl.data import PromptStream, load_prompts
from rlctl.distributed import gather_rollouts, reduce_metrics, shard
from rlctl.errors import ComponentError, RecipeError, RlctlError
from rlctl.evaluate import generate_in_batches
from rlctl.lora import adapters_disabled, apply_lora, is_lora, save_lora
from rlctl.metrics import LiveView, MetricsLog, check_trackers, summary_table, tracker_values
from rlctl.models import (ForwardOut, Policy, ValueHead, check_chat_template, frozen_copy, load_policy,
                          score_completions)
from rlctl.ops import default_totals
from rlctl.recipe import ComponentSpec, Recipe, Stage, check_stage_components, dumps_toml, resolved_dict
from rlctl.rollouts import Rollouts
from rlctl.state import TrainState

ACCURACY_THRESHOLD = 1.0  # a completion is "correct" when the first reward scores at least this


class Trainer:
    def __init__(self, recipe: Recipe, output_dir: str | Path | None = None, overwrite: bool = False,
                 show_progress: bool = True, resume: str | None = None):
        from accelerate import Accelerator

        self.recipe = recipe
        self.output_dir = rundir.output_dir_path(recipe.train.output_dir, recipe.name, explicit=output_dir)
        self.overwrite = overwrite
        t = recipe.train
        check_trackers(t.trackers)
        self.accelerator = Accelerator(
            cpu=t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available()),
            mixed_precision=t.mixed_precision,
            log_with=list(t.trackers) or None,
            project_dir=str(self.output_dir),
        )
        main = self.accelerator.is_main_process
        self.view = LiveView(recipe.total_steps, enabled=show_progress and main, messages=main)
        self.state = TrainState(total_steps=recipe.total_steps, output_dir=self.output_dir, recipe=recipe)
        self.value_head: ValueHead | None = None
        self.reference: torch.nn.Module | None = None  # a frozen copy (None with LoRA: adapters off)
        self.uses_reference = False
        self._ref_cache: dict[tuple[str, str], torch.Tensor] | None = None
        self.initial_reference: torch.nn.Module | None = None
        self.eval_results: dict[str, dict[str, float]] = {}
        self.resume = resume
        self.stop_requested = False  # set by the first Ctrl-C / SIGTERM
        self.bad_steps = 0  # consecutive steps whose update was skipped for non-finite values

    # ------------------------------------------------------------------------------------ setup
    def _prepare_output_dir(self) -> None:
        """Check and create the run directory (the main process writes; the others wait)."""
        if self.resume:
            self.checkpoint = resolve_resume(self.output_dir, self.resume)
            self.resume_state = load_state(self.checkpoint)
        if self.accelerator.is_main_process:
            self._claim_output_dir()
        self.accelerator.wait_for_everyone()

    def _claim_output_dir(self) -> None:
        """Claim the run directory (rlctl.rundir: only what rlctl wrote there is ever removed)."""
        rundir.claim(self.output_dir, overwrite=self.overwrite, resume=bool(self.resume),
                     entries=rundir.run_entries(self.recipe))
        if self.resume:
            _truncate_metrics(self.output_dir / "metrics.jsonl", self.resume_state["step"])
            return
        (self.output_dir / "recipe.resolved.toml").write_text(dumps_toml(resolved_dict(self.recipe)))
        (self.output_dir / "versions.json").write_text(json.dumps(_versions(), indent=2))

    def _setup(self) -> None:
        from accelerate.utils import set_seed

        # each process samples differently; data order is the same everywhere (PromptStream's own seed)
        set_seed(self.recipe.train.seed, device_specific=True)
        model_cfg = self.recipe.model
        lora = model_cfg.lora
        if self.resume and lora is None:  # the checkpoint's weights replace the recipe's starting point
            model_cfg = dataclasses.replace(model_cfg, name=str(self.checkpoint / "policy"), tiny=None)
        self.model, self.tokenizer = load_policy(model_cfg)
        for stage in self.recipe.stages:
            spec = stage.components["sampler"]
            if spec is not None and spec.options.get("chat_template"):
                check_chat_template(self.tokenizer, model_cfg.name or model_cfg.gguf_file or "tiny",
                                    f"[{spec.section}]")
        if lora is not None:  # a checkpoint of a LoRA run holds the adapters only
            self.model = apply_lora(self.model, lora, self.checkpoint / "policy" if self.resume else None)
        self.model.train()
        self.model = self.accelerator.prepare_model(self.model)
        self._data: dict[str, tuple[PromptStream, list]] = {}  # data table (as JSON) -> (stream, eval prompts)
        self._use_data(self.recipe.data)
        # a reference frozen at the start of the run, only if some stage asks for it
        needs_initial = any(s.train.reference == "initial" and "ref_logprobs" in self._stage_needs(s)
                            for s in self.recipe.stages)
        if needs_initial and lora is None:  # with LoRA the base model (adapters off) is the reference
            if self.resume:  # the initial policy is the recipe's model, not the checkpoint's
                initial, _ = load_policy(self.recipe.model)
                self.initial_reference = frozen_copy(initial.to(self.accelerator.device))
            else:
                self.initial_reference = frozen_copy(self.policy_model)
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl") if self.accelerator.is_main_process else None
        self.rng = torch.Generator().manual_seed(self.recipe.train.seed)  # mini-batch shuffling

    @property
    def _unwrapped_value_head(self) -> ValueHead | None:
        return None if self.value_head is None else self.accelerator.unwrap_model(self.value_head)

    def _use_data(self, data: dict[str, Any]) -> None:
        """Switch to the prompts of ``data`` (loaded once; each source keeps its own position)."""
        key = json.dumps(data, sort_keys=True)
        if key not in self._data:
            train_prompts, eval_prompts = load_prompts(data)
            self._data[key] = (PromptStream(train_prompts, self.recipe.train.seed),
                               eval_prompts[: self.recipe.eval.num_prompts])
        self.stream, self.eval_prompts = self._data[key]

    @property
    def policy_model(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _stage_needs(self, stage: Stage) -> set[str]:
        problems: list[str] = []
        built = check_stage_components(stage, problems)
        return stage_needs(built)

    # -------------------------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        self._prepare_output_dir()
        self._setup()
        started = time.perf_counter()
        first_stage, start_step = 0, 0
        if self.resume:
            first_stage, start_step = self.resume_state["stage_index"], self.resume_state["stage_step"]
            self.state.step = self.resume_state["step"]
            if first_stage < len(self.recipe.stages):
                self._use_data(self.recipe.stages[first_stage].data or self.recipe.data)
            self.stream.load_state_dict(self.resume_state["data"])
            self.eval_results = self.resume_state["eval_results"]
            self.bad_steps = self.resume_state["consecutive_bad_steps"]
            self.view.message(f"resuming from {self.checkpoint} at step {self.state.step}")
        restore_signals = self._install_signal_handlers()
        if self.recipe.train.trackers:
            self.accelerator.init_trackers(self.recipe.name, config=_flat(resolved_dict(self.recipe)))
        try:
            plugins.hook().rlctl_on_run_start(state=self.state)
            if self.recipe.eval.at_start and self.eval_prompts and not self.resume:
                self._evaluate(self.recipe.stages[0], self._build(self.recipe.stages[0]), label="start")
            for index in range(first_stage, len(self.recipe.stages)):
                self._run_stage(index, start_step if index == first_stage else 0)
        finally:
            restore_signals()
            if self.recipe.train.trackers:
                self.accelerator.end_training()
            self.view.close()
            if self.metrics:
                self.metrics.close()
        summary = self._summary(time.perf_counter() - started)
        if self.recipe.train.save_final:
            self.save(self.output_dir / "final")
        plugins.hook().rlctl_on_run_end(state=self.state, summary=summary)
        if self.accelerator.is_main_process:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _build(self, stage: Stage) -> dict[str, Any]:
        problems: list[str] = []
        built = check_stage_components(stage, problems)
        if problems:
            raise RecipeError(problems, source=self.recipe.source)
        return built

    def _run_stage(self, index: int, start_step: int = 0) -> None:
        stage = self.recipe.stages[index]
        self._use_data(stage.data or self.recipe.data)
        built = self._build(stage)
        needs = stage_needs(built)
        specs = stage.components
        self.state.stage, self.state.stage_steps, self.state.base_lr = stage.name, stage.steps, stage.train.lr
        self.state.components = built
        if "values" in needs and self.value_head is None:
            hidden = self.policy_model.config.get_text_config().hidden_size
            self.value_head = self.accelerator.prepare_model(ValueHead(hidden).to(self.accelerator.device))
        self.reference = None
        if "ref_logprobs" in needs and not is_lora(self.policy_model):
            self.reference = (self.initial_reference if stage.train.reference == "initial"
                              else frozen_copy(self.policy_model))
        self.uses_reference = "ref_logprobs" in needs
        # completions that depend only on the prompt (demonstrations, preference pairs) meet the same
        # frozen reference again every epoch: score each once per stage
        self._ref_cache = {} if self.uses_reference and getattr(built["sampler"], "deterministic", False) else None
        params = [p for p in self.model.parameters() if p.requires_grad]  # LoRA: the adapters only
        params += list(self.value_head.parameters()) if self.value_head else []
        optimizer = torch.optim.AdamW(params, lr=stage.train.lr, betas=tuple(stage.train.adam_betas),
                                      weight_decay=stage.train.weight_decay)
        self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        if self.resume and start_step > 0:  # mid-stage: the stage's optimizer, reference and RNG continue
            self._restore_stage(built)
        elif self.resume and index == self.resume_state["stage_index"]:
            acc = self.accelerator
            restore_rng(load_process_state(self.checkpoint, acc.process_index, acc.num_processes), self.rng)
        t = self.recipe.train
        for stage_step in range(start_step, stage.steps):
            self.state.stage_step = stage_step
            self._step(stage, built, specs, needs)
            self.state.step += 1
            last = stage_step + 1 == stage.steps
            every = self.recipe.eval.every
            if every and self.state.step % every == 0 and not last:
                self._evaluate(stage, built, label=f"step{self.state.step}")
            if last and self.eval_prompts:
                self._evaluate(stage, built, label=stage.name)
            periodic = t.save_every and self.state.step % t.save_every == 0
            end_of_run = last and index == len(self.recipe.stages) - 1
            if periodic or end_of_run or self.stop_requested:
                where = self._save_checkpoint(index, stage_step + 1, built)
            if self.stop_requested:
                raise Interrupted(
                    f"interrupted after step {self.state.step}; checkpoint written to {where}. Resume with: "
                    f"rlctl run {self.recipe.source} --output-dir {self.output_dir} --resume latest")

    # ---------------------------------------------------------------------------------- a step
    def _step(self, stage: Stage, built: dict[str, Any], specs: dict[str, Any], needs: set[str]) -> None:
        state, t = self.state, stage.train
        plugins.hook().rlctl_on_step_start(state=state)
        t0 = time.perf_counter()
        if built.get("scheduler") is not None:
            _guarded(specs["scheduler"], "scheduler", built["scheduler"].step, state)
        else:
            state.lr = stage.train.lr
        for group in self.optimizer.param_groups:
            group["lr"] = state.lr

        need_rewards = "rewards" in needs or "advantages" in needs
        rollouts, reward_stats, rounds, informative = self._collect(stage, built, specs, need_rewards)
        t_sample = time.perf_counter() - t0
        metrics: dict[str, Any] = {"step": state.step, "stage": stage.name, "lr": state.lr, **reward_stats}
        if rounds > 1:
            metrics["sampling_rounds"] = rounds

        rollouts = rollouts.to(self.accelerator.device)
        if self.accelerator.num_processes > 1:  # a skipped update must be skipped by every process
            from accelerate.utils import gather_object

            informative = all(gather_object([informative]))
        if informative:
            update_stats = self._learn(rollouts, built, specs, needs, t, metrics)
        else:
            update_stats = {"no_signal": 1.0}
            self.view.message(f"warning: step {state.step}: every group had identical rewards in {rounds} "
                              "sampling round(s); no update this step")
        elapsed = time.perf_counter() - t0
        tokens = rollouts.num_tokens
        metrics.update(update_stats)
        metrics.update({
            "completion_len": float(rollouts.lengths.float().mean().item()),
            "samples": len(rollouts),
            "tokens": tokens,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "sample_time": t_sample,
            "step_time": elapsed,
        })
        metrics = reduce_metrics(self.accelerator, metrics)
        state.last_metrics = metrics
        state.rollouts = rollouts
        if self.metrics:
            self.metrics.write(metrics)
        if self.recipe.train.trackers:
            self.accelerator.log(tracker_values(metrics), step=state.step)
        self.view.update(state.step, stage.name, metrics)
        plugins.hook().rlctl_on_step_end(state=state, metrics=metrics)
        self._check_finite(update_stats, stage)

    def _learn(self, rollouts: Rollouts, built: dict[str, Any], specs: dict[str, Any], needs: set[str],
               t: Any, metrics: dict[str, Any]) -> dict[str, float]:
        """Old/reference log-probs and values as required, advantages, then the optimizer updates."""
        # With one pass over one mini-batch the weights that score the batch are the ones that sampled
        # it, so the update's own forward gives the old log-probs (no extra pass) unless the advantage
        # estimator needs them before the update.
        advantage_needs_old = "old_logprobs" in requirements(built.get("advantage")) and "advantages" in needs
        on_policy_single_pass = t.ppo_epochs == 1 and t.mini_batches == 1 and not advantage_needs_old
        with torch.no_grad():
            if "values" in needs or ("old_logprobs" in needs and not on_policy_single_pass):
                old = self._forward(rollouts, grad=False, values="values" in needs)
                if "old_logprobs" in needs:
                    rollouts.old_logprobs = old.logprobs
                rollouts.values = old.values
            if self.uses_reference:
                rollouts.ref_logprobs = self._reference_logprobs(rollouts)
        if "advantages" in needs:
            rollouts.advantages = self._advantages(rollouts, built["advantage"], specs["advantage"])
            metrics.update(getattr(built["advantage"], "last_stats", None) or {})  # e.g. a KL in the reward

        return self._update(rollouts, built["loss"], specs["loss"], needs, t, on_policy_single_pass)

    def _collect(self, stage: Stage, built: dict[str, Any], specs: dict[str, Any],
                 need_rewards: bool) -> tuple[Rollouts, dict[str, float], int, bool]:
        """Sample (and score) a batch; with ``drop_uniform_groups``, keep refilling up to the batch size.

        Returns (rollouts, reward metrics, sampling rounds, whether anything is left to train on).
        """
        t = stage.train
        policy = Policy(self.policy_model, self.tokenizer)
        kept: list[Rollouts] = []
        first_stats: dict[str, float] = {}
        acc = self.accelerator
        wanted = t.prompts_per_step // acc.num_processes  # groups this process contributes
        groups_kept, rounds, next_group = 0, 0, 0
        while rounds < t.max_sampling_rounds and groups_kept < wanted:
            # a prompt-selecting sampler sees more candidates than it keeps (``candidates_per_prompt``)
            oversample = int(getattr(built["sampler"], "candidates_per_prompt", 1) or 1)
            prompts = self.stream.next_batch(t.prompts_per_step * oversample)
            local, offset = shard(prompts, acc.process_index, acc.num_processes)
            batch = _guarded(specs["sampler"], "sampler", built["sampler"].sample, policy, local,
                             t.group_size)
            batch.group_ids = batch.group_ids + next_group + offset  # globally unique group ids
            next_group += len(prompts)
            if need_rewards:
                batch.rewards, stats = self._score(batch, built["reward"], specs["reward"])
                if rounds == 0:
                    first_stats = stats  # metrics describe what the policy produced, before filtering
                self._observe(built["sampler"], specs["sampler"], batch)
            rounds += 1
            last = batch
            if t.drop_uniform_groups and batch.rewards is not None:
                batch = _drop_uniform_groups(batch)
                if len(batch) == 0:
                    continue
            kept.append(batch)
            groups_kept += int(torch.unique(batch.group_ids).numel())
            if not t.drop_uniform_groups:
                break
        if not kept:  # every group was uniform in every round: nothing to learn from this step
            return last, first_stats, rounds, False
        rollouts = Rollouts.concat(kept, pad_token_id=self.tokenizer.pad_token_id)
        if t.drop_uniform_groups:
            rollouts = _first_groups(rollouts, wanted)
        return rollouts, first_stats, rounds, True

    def _observe(self, sampler: Any, spec: ComponentSpec, batch: Rollouts) -> None:
        """Show a sampler every scored batch of all processes (before dynamic-sampling filters)."""
        observe = getattr(sampler, "observe", None)
        if observe is None:
            return
        if self.accelerator.num_processes > 1:  # every process keeps the same statistics
            batch, _ = gather_rollouts(self.accelerator, batch, self.tokenizer.pad_token_id)
        _guarded(spec, "sampler", observe, batch)

    def _advantages(self, rollouts: Rollouts, advantage: Any, spec: ComponentSpec) -> torch.Tensor:
        """Advantages computed on the batch of all processes, so they never depend on the split."""
        if self.accelerator.num_processes == 1:
            return _guarded(spec, "advantage", advantage.compute, rollouts)
        whole, mine = gather_rollouts(self.accelerator, rollouts, self.tokenizer.pad_token_id)
        values = _guarded(spec, "advantage", advantage.compute, whole)
        if whole.returns is not None:
            rollouts.returns = whole.returns[mine, : rollouts.completion_ids.shape[1]]
        return values[mine, : rollouts.completion_ids.shape[1]]

    def _score(self, rollouts: Rollouts, rewards: list[Any],
               specs: list[ComponentSpec]) -> tuple[torch.Tensor, dict[str, float]]:
        total = None
        stats: dict[str, float] = {}
        for i, (reward, spec) in enumerate(zip(rewards, specs)):
            value, failed = self._score_one(reward, spec, rollouts)
            if failed:
                stats[f"reward/{spec.name}/failed"] = float(failed)
            if value.shape[0] != len(rollouts):
                raise ComponentError(f"[{spec.section}] use = {spec.use!r}: score() returned {value.shape[0]} "
                                     f"values for {len(rollouts)} completions")
            per_sample = value if value.dim() == 1 else value.sum(dim=1)
            stats[f"reward/{spec.name}"] = float(per_sample.mean().item())
            for key, count in (getattr(reward, "last_stats", None) or {}).items():
                stats[f"reward/{spec.name}/{key}"] = float(count)  # e.g. timeouts of a code sandbox
            if i == 0:
                stats["accuracy"] = float((per_sample >= ACCURACY_THRESHOLD).float().mean().item())
            weighted = spec.weight * value
            if total is None:
                total = weighted
            elif total.dim() != weighted.dim():  # mix of outcome and process rewards: put outcome on last token
                raise ComponentError(f"[{spec.section}]: cannot add a per-token reward to a per-completion "
                                     "reward; use one kind in a recipe")
            else:
                total = total + weighted
        if total is None:
            total = torch.zeros(len(rollouts))
        stats["reward"] = float((total if total.dim() == 1 else total.sum(1)).mean().item())
        stats["reward_std"] = float((total if total.dim() == 1 else total.sum(1)).std(unbiased=False).item())
        return total, stats

    def _reference_logprobs(self, rollouts: Rollouts) -> torch.Tensor:
        """Reference log-probs; cached per (prompt, completion) when the sampler is deterministic."""
        if self._ref_cache is None:
            return self._score_reference(rollouts)
        keys = list(zip(rollouts.prompts, rollouts.completions))
        missing = [i for i, key in enumerate(keys) if key not in self._ref_cache]
        if missing:
            fresh = self._score_reference(rollouts.select(missing))
            for row, i in enumerate(missing):
                length = int(rollouts.completion_mask[i].sum())
                self._ref_cache[keys[i]] = fresh[row, :length].cpu()
        out = torch.zeros(rollouts.completion_ids.shape, dtype=torch.float32)
        for i, key in enumerate(keys):
            cached = self._ref_cache[key]
            out[i, : len(cached)] = cached
        return out.to(rollouts.completion_ids.device)

    def _score_reference(self, rollouts: Rollouts) -> torch.Tensor:
        if self.reference is None:  # LoRA: the base model is the policy with its adapters switched off
            with adapters_disabled(self.policy_model), self.accelerator.autocast():
                return score_completions(self.policy_model, rollouts).logprobs
        with self.accelerator.autocast():
            return score_completions(self.reference, rollouts).logprobs

    def _forward(self, rollouts: Rollouts, grad: bool, values: bool = False, entropy: bool = False) -> ForwardOut:
        ctx = nullcontext() if grad else torch.no_grad()
        with ctx, self.accelerator.autocast():
            return score_completions(self.model, rollouts, self.value_head if values else None, entropy)

    def _update(self, rollouts: Rollouts, loss_fn: Any, spec: ComponentSpec, needs: set[str], t: Any,
                on_policy_single_pass: bool) -> dict[str, float]:
        """Optimizer steps over mini-batches, each accumulated over micro-batches.

        The gradient of a step does not depend on how its mini-batch is split into micro-batches or
        across processes: every micro-batch sees ``totals``, the loss's counts over the whole mini-batch
        of all processes, so its loss is its share of the mini-batch's loss, and the shares add up.
        Gradients are averaged over processes (DDP/FSDP), hence the factor ``num_processes``.
        """
        stats_sum: dict[str, float] = {}
        loss_sum, micro_count, steps, skipped, norm_sum = 0.0, 0, 0, 0, 0.0
        world = self.accelerator.num_processes
        for _ in range(t.ppo_epochs):
            for mb_index in _group_batches(rollouts.group_ids, t.mini_batches, self.rng):
                mini = rollouts.select(mb_index)
                totals = self._totals(loss_fn, spec, mini)
                chunks = _micro_batches(mini.group_ids, t.micro_batch_size)
                for ci, chunk in enumerate(chunks):
                    micro = mini.select(chunk)
                    micro.totals = totals
                    sync = self.accelerator.no_sync(self.model) if ci < len(chunks) - 1 else nullcontext()
                    with sync:
                        out = self._forward(micro, grad=True, values="values" in needs, entropy="entropy" in needs)
                        if on_policy_single_pass and "old_logprobs" in needs:
                            micro.old_logprobs = out.logprobs.detach()  # same weights: no second forward
                        extra = {}
                        if out.entropy is not None:
                            extra["entropy"] = out.entropy
                        if out.values is not None:
                            extra["values"] = out.values
                        loss, stats = _guarded(spec, "loss", loss_fn.compute, micro, out.logprobs, **extra)
                        self.accelerator.backward(loss * world)
                    loss_sum += float(loss.item()) * world
                    for k, v in stats.items():
                        stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
                    micro_count += 1
                grad_norm = self._clip(t.max_grad_norm)
                if math.isfinite(grad_norm):
                    self.optimizer.step()
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

    def _totals(self, loss_fn: Any, spec: ComponentSpec, mini: Rollouts) -> dict[str, float]:
        """The loss's counts (``rollouts.totals``) over ``mini`` summed over all processes."""
        totals = default_totals(mini)
        if hasattr(loss_fn, "totals"):
            totals.update(_guarded(spec, "loss", loss_fn.totals, mini))
        if self.accelerator.num_processes > 1:
            keys = sorted(totals)
            summed = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
            summed = self.accelerator.reduce(summed, reduction="sum")
            totals = dict(zip(keys, summed.tolist()))
        return totals

    def _clip(self, max_norm: float) -> float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return 0.0
        if max_norm > 0:
            norm = self.accelerator.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
        return float(norm)

    def _score_one(self, reward: Any, spec: ComponentSpec, rollouts: Rollouts) -> tuple[torch.Tensor, int]:
        """Score a batch; if the reward raises, score sample by sample and give failed samples 0."""
        try:
            return _guarded(spec, "reward", reward.score, rollouts).float().cpu(), 0
        except ComponentError as batch_error:
            scores, failed, last_error = [], 0, batch_error
            for i in range(len(rollouts)):
                try:
                    scores.append(reward.score(rollouts.select([i])).float().cpu().reshape(-1)[0])
                except Exception as exc:
                    scores.append(torch.tensor(0.0))
                    failed, last_error = failed + 1, exc
            limit = self.recipe.train.max_reward_failure_rate
            if failed > limit * len(rollouts):
                raise ComponentError(f"reward {spec.use!r} (plugin {_plugin_of('reward', spec)}, recipe section "
                                     f"[{spec.section}]) failed on {failed} of {len(rollouts)} completions, above "
                                     f"[train] max_reward_failure_rate = {limit}; last error: "
                                     f"{type(last_error).__name__}: {last_error}") from batch_error
            self.view.message(f"warning: reward {spec.use!r} failed on {failed} completion(s), scored 0: "
                              f"{type(last_error).__name__}: {last_error}")
            return torch.stack(scores), failed

    def _check_finite(self, update_stats: dict[str, float], stage: Stage) -> None:
        if not update_stats.get("skipped_updates"):
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.view.message(f"warning: step {self.state.step}: non-finite loss or gradient, update skipped "
                          f"({self.bad_steps} in a row)")
        limit = self.recipe.train.max_bad_steps
        if self.bad_steps >= limit:
            index = self.recipe.stages.index(stage)
            where = self._save_checkpoint(index, self.state.stage_step + 1, None, step=self.state.step + 1)
            raise RlctlError(f"aborting: {self.bad_steps} consecutive steps with a non-finite loss or gradient "
                             f"([train] max_bad_steps = {limit}); checkpoint written to {where}. Lower the "
                             "learning rate or check the rewards, then resume with --resume latest")

    # --------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, stage_index: int, next_stage_step: int, built: dict[str, Any] | None,
                         step: int | None = None) -> Path | None:
        stage = self.recipe.stages[stage_index]
        if next_stage_step >= stage.steps:  # the stage is done: resume at the start of the next one
            stage_index, next_stage_step = stage_index + 1, 0
        built = built if built is not None else self.state.components
        local = process_state(self.rng, _component_states(built))
        everyone = [local]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            everyone = gather_object([local])
        snap = Snapshot(step=self.state.step if step is None else step, stage_index=stage_index,
                        stage_step=next_stage_step, data_state=self.stream.state_dict(),
                        eval_results=self.eval_results, process_states=everyone,
                        consecutive_bad_steps=self.bad_steps)
        path = None
        if self.accelerator.is_main_process:  # one writer
            path = save_checkpoint(self.output_dir, snap, model=self.policy_model, tokenizer=self.tokenizer,
                                   optimizer=self.optimizer, value_head=self._unwrapped_value_head,
                                   reference=self.reference if next_stage_step else None,
                                   keep=self.recipe.train.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return path

    def _restore_stage(self, built: dict[str, Any]) -> None:
        path = self.checkpoint
        if self.value_head is not None and (path / "value_head.safetensors").exists():
            load_weights(self._unwrapped_value_head, path / "value_head.safetensors")
        if self.reference is not None and (path / "reference.safetensors").exists():
            load_weights(self.reference, path / "reference.safetensors")
        load_optimizer(self.optimizer, path)
        local = load_process_state(path, self.accelerator.process_index, self.accelerator.num_processes)
        for key, component in _components_by_key(built).items():
            saved = local["components"].get(key)
            if saved is not None and hasattr(component, "load_state_dict"):
                component.load_state_dict(saved)
        restore_rng(local, self.rng)

    def _install_signal_handlers(self) -> Callable[[], None]:
        """First Ctrl-C / SIGTERM: stop after the current step with a checkpoint; second: stop now."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, frame: Any) -> None:
            if self.stop_requested:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt
            self.stop_requested = True
            self.view.message("stopping after this step and writing a checkpoint (Ctrl-C again to quit now)")

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    # ------------------------------------------------------------------------------ evaluation
    def _evaluate(self, stage: Stage, built: dict[str, Any], label: str) -> dict[str, float]:
        rewards, specs = built["reward"], stage.components["reward"]
        if not rewards:  # e.g. an SFT stage: score with the first stage that defines rewards
            for other in self.recipe.stages:
                if other.components["reward"]:
                    rewards, specs = self._build(other)["reward"], other.components["reward"]
                    break
        if not rewards or not self.eval_prompts or not self.accelerator.is_main_process:
            return {}  # evaluation runs on the main process only (no collective operations)
        sampler = built.get("sampler")
        max_new = self.recipe.eval.max_new_tokens or _max_new_tokens(self.recipe) or 64
        rollouts = generate_in_batches(Policy(self.policy_model, self.tokenizer), self.eval_prompts, 1,
                                       self.recipe.eval.batch_size, self.tokenizer.pad_token_id,
                                       max_new_tokens=max_new, do_sample=False,
                                       chat_template=getattr(sampler, "chat_template", False))
        _, stats = self._score(rollouts, rewards, specs)
        result = {"eval/accuracy": stats["accuracy"], "eval/reward": stats["reward"],
                  "eval/completion_len": float(rollouts.lengths.float().mean().item())}
        self.eval_results[label] = result
        if self.metrics:
            self.metrics.write({"step": self.state.step, "stage": stage.name, "eval": label, **result})
        if self.recipe.train.trackers:
            self.accelerator.log(result, step=self.state.step)
        when = f"after stage {label!r}" if label == stage.name else f"at step {self.state.step}"
        self.view.message(f"eval {when}: held-out accuracy {result['eval/accuracy']:.3f} "
                          f"({len(rollouts)} prompts, greedy), reward {result['eval/reward']:.3f}")
        return result

    # -------------------------------------------------------------------------------- outputs
    def save(self, path: Path) -> None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        tmp = rundir.temp_dir(path.parent)  # a fresh directory: nothing of the user's is written over
        try:
            if is_lora(self.policy_model):
                save_lora(self.policy_model, self.tokenizer, tmp, self.recipe.model.lora.get("save", "adapter"))
            else:
                self.policy_model.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
            if self.value_head is not None:
                from safetensors.torch import save_file
                save_file(self._unwrapped_value_head.state_dict(), str(tmp / "value_head.safetensors"))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        rundir.install(tmp, path)  # replaces ``path`` only if rlctl wrote it

    def _summary(self, seconds: float) -> dict[str, Any]:
        last = self.state.last_metrics
        summary: dict[str, Any] = {"steps": self.state.step, "seconds": round(seconds, 1)}
        for key in ("reward", "accuracy", "kl", "loss", "completion_len", "tokens_per_s"):
            if key in last:
                summary[f"last/{key}"] = last[key]
        stage_names = {stage.name for stage in self.recipe.stages}
        for label, result in self.eval_results.items():
            if label in stage_names or label == "start":  # intermediate evaluations stay in metrics.jsonl
                summary[f"eval/{label}/accuracy"] = result["eval/accuracy"]
        return summary

    def print_summary(self, summary: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        self.view.console.print(summary_table(f"run summary: {self.output_dir}", summary))
        stage_evals = [(f"after {s.name}", self.eval_results[s.name]["eval/accuracy"]) for s in self.recipe.stages
                       if s.name in self.eval_results]
        if "start" in self.eval_results:
            stage_evals.insert(0, ("at the start", self.eval_results["start"]["eval/accuracy"]))
        if stage_evals:
            trail = " -> ".join(f"{acc:.3f} {when}" for when, acc in stage_evals)
            self.view.console.print(f"held-out accuracy: {trail}", highlight=False)


# ------------------------------------------------------------------------------------ helpers
def _guarded(spec: ComponentSpec, kind: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a component method; an exception is re-raised naming plugin, kind and recipe section."""
    try:
        return fn(*args, **kwargs)
    except RlctlError:
        raise
    except Exception as exc:
        raise ComponentError(f"{kind} {spec.use!r} (plugin {_plugin_of(kind, spec)}, recipe section "
                             f"[{spec.section}]) raised {type(exc).__name__}: {exc}") from exc


class Interrupted(RlctlError):
    """The run was stopped by a signal after writing a checkpoint."""

    exit_code = 130


def _plugin_of(kind: str, spec: ComponentSpec) -> str:
    try:
        return plugins.registry().get(kind, spec.use).plugin
    except Exception:  # pragma: no cover - the component was built from the registry
        return "?"


def _components_by_key(built: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for kind, value in built.items():
        if isinstance(value, list):
            out.update({f"{kind}[{i}]": v for i, v in enumerate(value)})
        elif value is not None:
            out[kind] = value
    return out


def _component_states(built: dict[str, Any]) -> dict[str, Any]:
    """state_dict() of every component that has one (e.g. prompt statistics of a sampler)."""
    return {key: c.state_dict() for key, c in _components_by_key(built).items() if hasattr(c, "state_dict")}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint at ``step`` (they will be produced again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines(keepends=True) if line.strip() and (
        json.loads(line)["step"] < step or ("eval" in json.loads(line) and json.loads(line)["step"] <= step))]
    path.write_text("".join(keep))


def _group_batches(group_ids: torch.Tensor, parts: int, rng: torch.Generator) -> list[torch.Tensor]:
    """Shuffle whole groups and split them into ``parts`` mini-batches of sample indices.

    Groups are never split, so that losses comparing completions of one prompt (DPO pairs,
    group-normalised terms) always see the whole group.
    """
    groups = torch.unique(group_ids)
    order = groups[torch.randperm(len(groups), generator=rng)]
    return [torch.isin(group_ids, chunk).nonzero().flatten() for chunk in order.tensor_split(parts)
            if len(chunk)]


def _micro_batches(group_ids: torch.Tensor, size: int) -> list[torch.Tensor]:
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


def _drop_uniform_groups(rollouts: Rollouts) -> Rollouts:
    """Keep only groups whose rewards are not all equal (they carry no group-relative signal)."""
    r = rollouts.rewards if rollouts.rewards.dim() == 1 else rollouts.rewards.sum(1)
    keep = []
    for g in torch.unique(rollouts.group_ids):
        idx = (rollouts.group_ids == g).nonzero().flatten()
        if r[idx].max() > r[idx].min():
            keep.append(idx)
    if not keep:
        return rollouts.select(torch.zeros(0, dtype=torch.long))
    return rollouts.select(torch.cat(keep))


def _first_groups(rollouts: Rollouts, k: int) -> Rollouts:
    groups = torch.unique(rollouts.group_ids, sorted=True)[:k]
    return rollouts.select(torch.isin(rollouts.group_ids, groups).nonzero().flatten())


def _max_new_tokens(recipe: Recipe) -> int:
    for stage in reversed(recipe.stages):
        spec = stage.components["sampler"]
        if spec is not None and "max_new_tokens" in spec.options:
            return int(spec.options["max_new_tokens"])
    return 0


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested recipe tables as one level of ``a.b.c`` keys with scalar values (tracker configs)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list):
        if all(not isinstance(v, (dict, list)) for v in tree):
            return {prefix[:-1]: str(tree)}
        out = {}
        for i, value in enumerate(tree):
            out.update(_flat(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("rlctl", "torch", "transformers", "accelerate", "pluggy", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out

