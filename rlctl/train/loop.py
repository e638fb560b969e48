"""The training loop: stage after stage, step after step,

    prompts -> RolloutSource (sampler, Scorer) -> Learner (advantages, loss, optimizer) -> metrics,
               Evaluator and Checkpointer at their intervals.

No algorithm lives here: what gets computed is decided by the components' ``requires`` declarations
(see ``rlctl.components``), never by their names. Each arrow is a module of ``rlctl.train``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from rlctl import plugins
from rlctl.components import stage_needs
from rlctl.errors import RlctlError, RolloutsUnavailable
from rlctl.metrics import LiveView, MetricsLog, check_trackers, tracker_values
from rlctl.models import Policy, load_policy
from rlctl.recipe import Recipe, Stage, check_stage_components, resolved_dict
from rlctl.state import TrainState
from rlctl.train import outputs, rundir
from rlctl.train.async_source import AsyncRolloutSource, check_async_stage, runs_async
from rlctl.train.checkpointer import Checkpointer, truncate_metrics
from rlctl.train.components import build, close_components, guarded
from rlctl.train.engine import make_engine, reduce_metrics
from rlctl.train.evaluator import Evaluator
from rlctl.train.learner import BadSteps, Learner
from rlctl.train.policy_setup import load_run_policy
from rlctl.train.reference import Reference
from rlctl.train.rollout_source import PromptSources, RolloutSource
from rlctl.train.scorer import Scorer
from rlctl.train.signals import StopRequest


class Interrupted(RlctlError):
    """The run was stopped by a signal after writing a checkpoint."""

    exit_code = 130


class Trainer:
    def __init__(self, recipe: Recipe, output_dir: str | Path | None = None, overwrite: bool = False,
                 show_progress: bool = True, resume: str | None = None):
        self.recipe, self.overwrite, self.resume = recipe, overwrite, resume
        self.output_dir = rundir.output_dir_path(recipe.train.output_dir, recipe.name, explicit=output_dir)
        t = recipe.train
        check_trackers(t.trackers)
        self.engine = make_engine(t, str(self.output_dir))
        main = self.engine.is_main
        self.view = LiveView(recipe.total_steps, enabled=show_progress and main, messages=main)
        self.state = TrainState(total_steps=recipe.total_steps, output_dir=self.output_dir, recipe=recipe)
        self.scorer = Scorer(t.max_reward_failure_rate, self.view.message)
        self.evaluator = Evaluator(recipe, self.scorer, self.engine, self.view.message)
        self.checkpointer = Checkpointer(self.engine, self.output_dir, t.keep_checkpoints)
        self.references = Reference(self.engine)
        self.stop = StopRequest(self.view.message)
        self.bad_steps = BadSteps(t.max_bad_steps, self.view.message)

    # ------------------------------------------------------------------------------------ views
    @property
    def policy_model(self) -> torch.nn.Module:
        return self.learner.policy

    @property
    def reference(self) -> torch.nn.Module | None:
        """The stage's frozen reference model (None without one, and with LoRA: adapters off)."""
        return self.references.model

    @property
    def value_head(self) -> torch.nn.Module | None:
        return self.learner.value_head

    @property
    def eval_results(self) -> dict[str, dict[str, float]]:
        return self.evaluator.results

    # ------------------------------------------------------------------------------------ setup
    def _claim_output_dir(self) -> None:
        """Claim the run directory (the main process writes; the others wait)."""
        if self.resume:
            self.checkpointer.open_resume(self.resume)
        if self.engine.is_main:
            rundir.claim(self.output_dir, overwrite=self.overwrite, resume=bool(self.resume),
                         entries=rundir.run_entries(self.recipe))
            if self.resume:
                truncate_metrics(self.output_dir / "metrics.jsonl", self.checkpointer.resumed["step"])
            else:
                outputs.write_run_info(self.output_dir, self.recipe)
        self.engine.barrier()

    def _setup(self) -> None:
        from accelerate.utils import set_seed

        # each process samples differently; data order is the same everywhere (PromptStream's own seed)
        set_seed(self.recipe.train.seed, device_specific=True)
        lora = self.recipe.model.lora
        model, self.tokenizer = load_run_policy(self.recipe, self.checkpointer.checkpoint if self.resume else None)
        self.learner = Learner(self.engine, self.engine.prepare_model(model), self.references,
                               self.tokenizer.pad_token_id, self.recipe.train.seed)
        self.sync_source = RolloutSource(self.engine, self.scorer, self.tokenizer.pad_token_id,
                                         lambda: self.learner.version)
        self.rollout_source: RolloutSource = self.sync_source  # the stage's (asynchronous ones are per stage)
        self._data = PromptSources(self.recipe.train.seed, self.recipe.eval.num_prompts)
        self._use_data(self.recipe.data)
        # a reference frozen at the start of the run, only if some stage asks for it
        needs_initial = any(s.train.reference == "initial" and "ref_logprobs" in stage_needs(
            check_stage_components(s, [])) for s in self.recipe.stages)
        if needs_initial and lora is None:  # with LoRA the base model (adapters off) is the reference
            if self.resume:  # the initial policy is the recipe's model, not the checkpoint's
                initial, _ = load_policy(self.recipe.model)
                self.references.freeze_initial(initial.to(self.engine.device), loaded_apart=True)
            else:
                self.references.freeze_initial(self.policy_model)
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl") if self.engine.is_main else None

    def _use_data(self, data: dict[str, Any]) -> None:
        self.stream, self.eval_prompts = self._data.use(data)

    # -------------------------------------------------------------------------------- the run
    def run(self) -> dict[str, Any]:
        self.view.message(outputs.engine_line(self.engine.describe()))
        self._claim_output_dir()
        self._setup()
        started = time.perf_counter()
        first_stage, start_step, resumed = 0, 0, self.checkpointer.resumed
        if self.resume:
            first_stage, start_step = resumed["stage_index"], resumed["stage_step"]
            self.state.step = resumed["step"]
            if first_stage < len(self.recipe.stages):
                self._use_data(self.recipe.stages[first_stage].data or self.recipe.data)
            self.stream.load_state_dict(resumed["data"])
            self.evaluator.results.update(resumed["eval_results"])
            self.bad_steps.in_a_row = resumed["consecutive_bad_steps"]
            self.view.message(f"resuming from {self.checkpointer.checkpoint} at step {self.state.step}")
        restore_signals = self.stop.install()
        if self.recipe.train.trackers:
            self.engine.init_trackers(self.recipe.name, outputs.flat(resolved_dict(self.recipe)))
        try:
            plugins.hook().rlctl_on_run_start(state=self.state)
            if self.recipe.eval.at_start and self.eval_prompts and not self.resume:
                first = self.recipe.stages[0]
                self._evaluate(first, build(first, self.recipe.source), label="start")
            for index in range(first_stage, len(self.recipe.stages)):
                self._run_stage(index, start_step if index == first_stage else 0)
        finally:
            restore_signals()
            if self.recipe.train.trackers:
                self.engine.end_trackers()
            self.view.close()
            if self.metrics:
                self.metrics.close()
        summary = outputs.summary(self.recipe, self.state.step, time.perf_counter() - started,
                                  self.state.last_metrics, self.eval_results, self.engine.describe())
        try:
            if self.recipe.train.save_final:
                outputs.save_final_model(self.engine, self.output_dir / "final", self.learner, self.tokenizer,
                                         (self.recipe.model.lora or {}).get("save", "adapter"))
        finally:
            self.engine.close()
        plugins.hook().rlctl_on_run_end(state=self.state, summary=summary)
        if self.engine.is_main:
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _run_stage(self, index: int, start_step: int = 0) -> None:
        stage = self.recipe.stages[index]
        self._use_data(stage.data or self.recipe.data)
        built = build(stage, self.recipe.source)
        needs = stage_needs(built)
        self.state.stage, self.state.stage_steps, self.state.base_lr = stage.name, stage.steps, stage.train.lr
        self.state.components = built
        self.learner.start_stage(stage, needs)
        self.references.start_stage(self.policy_model, "ref_logprobs" in needs, stage.train.reference,
                                   bool(getattr(built["sampler"], "deterministic", False)))
        self.learner.new_optimizer(stage)
        if self.resume and start_step > 0:  # mid-stage: the stage's optimizer, reference and RNG continue
            self.checkpointer.restore_stage(self.learner, self.references, built)
        elif self.resume and index == self.checkpointer.resumed["stage_index"]:
            self.checkpointer.restore_rng(self.learner)
        threads = torch.get_num_threads()
        try:
            self.rollout_source = self._start_rollout_source(stage, built, start_step)
            for stage_step in range(start_step, stage.steps):
                self._stage_step(index, stage, built, needs, stage_step)
        finally:
            self.rollout_source.close()  # an asynchronous source's worker process
            self.rollout_source = self.sync_source
            torch.set_num_threads(threads)
            close_components(built)  # e.g. an inference engine or the rollout server a sampler started

    def _start_rollout_source(self, stage: Stage, built: dict[str, Any], start_step: int) -> RolloutSource:
        """The synchronous source, or (``max_staleness`` > 0) a worker process sampling ahead of the learner."""
        if not runs_async(stage, built["sampler"]):
            return self.sync_source
        check_async_stage(stage, built["sampler"], self.engine.num_processes)
        source = AsyncRolloutSource(self.engine, self.scorer, self.tokenizer.pad_token_id,
                                    lambda: self.learner.version, lambda: self.state.step, self.view.message,
                                    self.recipe.train.seed)
        # the worker and the learner split this process's CPU threads (on a GPU both use the device)
        total = torch.get_num_threads()
        worker_threads = self.recipe.train.rollout_threads or max(1, total // 2)
        torch.set_num_threads(max(1, total - worker_threads))
        saved = self.checkpointer.resumed_rollouts if self.resume and start_step > 0 else None
        try:
            source.start_stage(stage, self.policy_model, self.tokenizer, self.stream,
                               stage_end=self.state.step - start_step + stage.steps, threads=worker_threads,
                               saved=saved)
        except BaseException:
            source.close()
            raise
        self.view.message(f"stage {stage.name!r}: rollouts from a worker process ({worker_threads} thread(s)) "
                          f"up to {stage.train.max_staleness} step(s) ahead of the learner")
        return source

    def _stage_step(self, index: int, stage: Stage, built: dict[str, Any], needs: set[str], stage_step: int) -> None:
        self.state.stage_step = stage_step
        data_before = self.stream.state_dict()
        try:
            self._step(stage, built, needs)
        except RolloutsUnavailable as exc:  # nothing of this step was learned: resume takes it again
            # (an asynchronous source keeps the step's requests itself: the data position stays where it is)
            where = self._save_checkpoint(index, stage_step, built,
                                          data_state=None if self.rollout_source.asynchronous else data_before)
            raise RolloutsUnavailable(f"{exc}; checkpoint written to {where}. {self._resume_hint()}") from exc
        self.state.step += 1
        last = stage_step + 1 == stage.steps
        every = self.recipe.eval.every
        if every and self.state.step % every == 0 and not last:
            self._evaluate(stage, built, label=f"step{self.state.step}")
        if last and self.eval_prompts:
            self._evaluate(stage, built, label=stage.name)
        periodic = self.recipe.train.save_every and self.state.step % self.recipe.train.save_every == 0
        if periodic or (last and index == len(self.recipe.stages) - 1) or self.stop.requested:
            where = self._save_checkpoint(index, stage_step + 1, built)
        if self.stop.requested:
            raise Interrupted(f"interrupted after step {self.state.step}; checkpoint written to {where}. "
                              + self._resume_hint())

    def _resume_hint(self) -> str:
        return (f"Resume with: rlctl run {self.recipe.source} --output-dir {self.output_dir} --resume latest"
                + (f" --processes {self.engine.num_processes}" if self.engine.num_processes > 1 else ""))

    # ---------------------------------------------------------------------------------- a step
    def _step(self, stage: Stage, built: dict[str, Any], needs: set[str]) -> None:
        state, specs = self.state, stage.components
        plugins.hook().rlctl_on_step_start(state=state)
        t0 = time.perf_counter()
        if built.get("scheduler") is not None:
            guarded(specs["scheduler"], "scheduler", built["scheduler"].step, state)
        else:
            state.lr = stage.train.lr
        self.learner.set_lr(state.lr)
        batch = self.rollout_source.collect(Policy(self.policy_model, self.tokenizer), self.stream, stage, built,
                                            specs, "rewards" in needs or "advantages" in needs)
        t_sample = time.perf_counter() - t0
        metrics: dict[str, Any] = {"step": state.step, "stage": stage.name, "lr": state.lr, **batch.reward_stats}
        if batch.rounds > 1:
            metrics["sampling_rounds"] = batch.rounds
        rollouts = batch.rollouts.to(self.engine.device)
        if self.engine.all_true(batch.informative):  # a skipped update must be skipped by every process
            metrics.update(self.learner.learn(rollouts, built, specs, needs, stage.train, metrics))
        else:
            metrics["no_signal"] = 1.0
            self.view.message(f"warning: step {state.step}: every group had identical rewards in {batch.rounds} "
                              "sampling round(s); no update this step")
        self.rollout_source.after_update(self.policy_model, state.step + 1)  # e.g. publish to a rollout worker
        elapsed = time.perf_counter() - t0
        tokens = rollouts.num_tokens
        metrics.update({"completion_len": float(rollouts.lengths.float().mean().item()), "samples": len(rollouts),
                        "tokens": tokens, "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
                        "samples_per_s": len(rollouts) / elapsed if elapsed > 0 else 0.0,
                        "learner_tokens_per_s": tokens / max(elapsed - t_sample, 1e-9),
                        "sample_time": t_sample, "step_time": elapsed, **batch.metrics})
        sampler_metrics = getattr(built.get("sampler"), "batch_metrics", None)
        if sampler_metrics is not None:  # e.g. tool use of multi-turn trajectories
            metrics.update(guarded(specs["sampler"], "sampler", sampler_metrics, rollouts))
        if "rollout_wait_time" in batch.metrics and elapsed > 0:
            metrics["learner_idle_frac"] = batch.metrics["rollout_wait_time"] / elapsed
        metrics = reduce_metrics(self.engine, metrics)
        state.last_metrics, state.rollouts = metrics, rollouts
        if self.metrics:
            self.metrics.write(metrics)
        if self.recipe.train.trackers:
            self.engine.log(tracker_values(metrics), step=state.step)
        self.view.update(state.step, stage.name, metrics)
        plugins.hook().rlctl_on_step_end(state=state, metrics=metrics)
        if self.bad_steps.count(metrics):
            index = self.recipe.stages.index(stage)
            where = self._save_checkpoint(index, self.state.stage_step + 1, None, step=self.state.step + 1)
            raise self.bad_steps.abort(where)

    def _save_checkpoint(self, stage_index: int, next_stage_step: int, built: dict[str, Any] | None,
                         step: int | None = None, data_state: dict[str, int] | None = None) -> Path | None:
        if next_stage_step >= self.recipe.stages[stage_index].steps:  # done: resume at the next stage
            stage_index, next_stage_step = stage_index + 1, 0
        return self.checkpointer.save(
            step=self.state.step if step is None else step, stage_index=stage_index, stage_step=next_stage_step,
            data_state=data_state or self.stream.state_dict(), eval_results=self.eval_results,
            bad_steps=self.bad_steps.in_a_row, learner=self.learner, tokenizer=self.tokenizer,
            reference=self.references.model if next_stage_step else None,
            built=built if built is not None else self.state.components,
            rollout_state=self.rollout_source.state_dict())

    def _evaluate(self, stage: Stage, built: dict[str, Any], label: str) -> None:
        result = self.evaluator.evaluate(Policy(self.policy_model, self.tokenizer), self.eval_prompts, stage,
                                         built, label, self.state.step)
        if result and self.metrics:
            self.metrics.write({"step": self.state.step, "stage": stage.name, "eval": label, **result})
        if result and self.recipe.train.trackers:
            self.engine.log(result, step=self.state.step)

    def print_summary(self, summary: dict[str, Any]) -> None:
        if self.engine.is_main:
            outputs.print_summary(self.view.console, self.output_dir, summary, self.recipe, self.eval_results)
