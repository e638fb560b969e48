"""The asynchronous rollout source: a worker process samples while the learner trains.

With ``[train] max_staleness = k`` (k >= 1) the learner keeps up to k + 1 requests in flight: while it
learns from step s's batch, the worker samples the batches of steps s + 1 .. s + k. A request meant for
step t may only be sampled by weights of version >= t - k (versions count training steps); requests are
consumed in order and every step consumes at least one, so no batch is ever more than k versions older
than the weights that learn from it. After every step the learner publishes its weights
(``weight_sync.py``) and the worker loads the newest version before its next request.

Exactly once: prompts are drawn from the stream when a request is sent, so a checkpoint holds the data
position after every request sent, the requests not yet learned from (their prompts and seeds) and the
batches the worker already returned for them. A resumed run sends the unanswered requests again and
learns from the returned batches first: no prompt is dropped or repeated, and the staleness bound holds
(the saved batches were sampled within k versions of the step that will learn from them).

A worker that dies is started again and the requests it had not answered are sampled again (each
request has its own seed); after ``MAX_RESTARTS`` deaths in one stage the run stops with a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import torch

from rlctl.data import PromptStream
from rlctl.errors import ComponentError, RlctlError, RolloutsUnavailable
from rlctl.models import Policy
from rlctl.recipe import Stage
from rlctl.rollouts import LIST_FIELDS, TENSOR_FIELDS, Prompt, Rollouts
from rlctl.train.engine import Engine
from rlctl.train.rollout_source import RolloutSource
from rlctl.train.rollout_worker import Request, Result, WorkerConfig, WorkerProcess, request_seed
from rlctl.train.scorer import Scorer
from rlctl.train.weight_sync import WeightPublisher

MAX_RESTARTS = 3  # worker deaths tolerated in one stage


def check_async_stage(stage: Stage, sampler: Any, num_processes: int) -> None:
    """One-line errors for what asynchronous rollouts cannot run."""
    k, use = stage.train.max_staleness, stage.components["sampler"].use
    where = f"[train] max_staleness = {k}"
    if num_processes > 1:
        raise RlctlError(f"{where} with {num_processes} processes: asynchronous rollouts run with one learner "
                         "process and one rollout worker; use max_staleness = 0 with --processes")
    if getattr(sampler, "candidates_per_prompt", None) or hasattr(sampler, "observe"):
        raise RlctlError(f"{where}: sampler {use!r} chooses prompts from the rewards it observed, which needs "
                         "the learner's scores of the batch before; use max_staleness = 0 with it")
    if getattr(sampler, "runs_in_worker", True) is False:
        raise RlctlError(f"{where}: sampler {use!r} cannot run in the rollout worker process; use "
                         "max_staleness = 0 with it (or a sampler that can, e.g. use = \"hf\")")
    if stage.train.partial_rollouts and not getattr(sampler, "supports_partial_rollouts", False):
        raise RlctlError(f"[train] partial_rollouts = true: sampler {use!r} cannot change weights part-way "
                         "through a completion; use partial_rollouts = false with it (or use = \"hf\")")


def runs_async(stage: Stage, sampler: Any) -> bool:
    """A stage samples asynchronously when it asks for it and its sampler uses the policy at all
    (demonstrations come from the data: there is nothing to sample ahead)."""
    return stage.train.max_staleness > 0 and not getattr(sampler, "deterministic", False)


class AsyncRolloutSource(RolloutSource):
    asynchronous = True

    def __init__(self, engine: Engine, scorer: Scorer, pad_token_id: int, policy_version: Callable[[], int],
                 current_step: Callable[[], int], message: Callable[[str], None], seed: int):
        super().__init__(engine, scorer, pad_token_id, policy_version)
        self.current_step = current_step  # training steps done so far in the run: the published version
        self.message = message
        self.seed = seed
        self.worker: WorkerProcess | None = None
        self.publisher: WeightPublisher | None = None
        self.outstanding: dict[int, Request] = {}  # sent, not yet learned from (index -> request)
        self.ready: dict[int, Result] = {}  # returned by the worker, not yet learned from
        # learned from in the step under way: back to ``outstanding`` and ``ready`` if the step fails
        self.taken: list[tuple[Request, Result]] = []
        self.next_request = 0
        self.versions: dict[int, int] = {}  # published version (steps) -> optimizer steps in it
        self._reset_step_stats()

    # ------------------------------------------------------------------------------- the stage
    def start_stage(self, stage: Stage, model: torch.nn.Module, tokenizer: Any, stream: PromptStream,
                    stage_end: int, threads: int, saved: dict[str, Any] | None = None) -> None:
        """Publish the policy, start the worker, restore a checkpoint's requests and fill the pipeline."""
        self.stage, self.stream, self.stage_end = stage, stream, stage_end
        self.publisher = WeightPublisher(model, tokenizer)
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        config = WorkerConfig(str(self.publisher.dir), stage.components["sampler"], str(self.engine.device),
                              dtype, threads, partial_rollouts=stage.train.partial_rollouts)
        self.worker = WorkerProcess(config)
        if saved:
            self.load_state_dict(saved)
        self.worker.start()
        for index in sorted(self.outstanding):  # a checkpoint's requests (they wait for the weights below)
            if index not in self.ready:
                self.worker.send(self.outstanding[index])
        self.after_update(model, self.current_step())

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None

    # ------------------------------------------------------------------------------ a round
    def collect(self, policy: Policy, stream: PromptStream, stage: Stage, built: dict[str, Any],
                specs: dict[str, Any], need_rewards: bool) -> Any:
        self._reset_step_stats()
        batch = super().collect(policy, stream, stage, built, specs, need_rewards)
        batch.metrics = self._step_metrics()
        return batch

    def sample_round(self, policy: Policy, stream: PromptStream, stage: Stage, built: dict[str, Any],
                     specs: dict[str, Any]) -> tuple[Rollouts, int]:
        self._fill(self.current_step())
        if not self.outstanding:  # an extra round (dynamic sampling) beyond the pipeline: ask now
            self._send(self.current_step())
        index = min(self.outstanding)
        waited = time.perf_counter()
        result = self._result(index)
        self.stats["wait_s"] += time.perf_counter() - waited
        request = self.outstanding.pop(index)
        self.taken.append((request, result))
        staleness = self.current_step() - result.version
        if staleness > self.stage.train.max_staleness:  # cannot happen by construction; never learn from it
            raise RlctlError(f"internal error: a batch {staleness} versions old exceeds max_staleness")
        n = len(result.rollouts)
        self.stats["staleness"].extend([staleness] * n)
        if result.rollouts.token_versions is not None:  # partial rollouts: ages per token
            self._count_token_versions(result.rollouts)
        self.stats["worker_idle_s"] += result.idle_s
        self.stats["worker_busy_s"] += result.busy_s
        batch = dataclasses.replace(result.rollouts)
        batch.policy_version = self.versions.get(result.version, result.version)
        return batch, len(request.prompts)

    def after_update(self, model: torch.nn.Module, version: int) -> None:
        """Publish the weights after ``version`` training steps; the step's batches are learned from."""
        self.taken = []
        self.versions[version] = self.policy_version()
        self.publisher.publish(model, version)
        self.worker.announce(version)
        self.publisher.prune(below=version - 1)  # the worker may be opening the previous one right now
        self._fill(version)  # the step that learns next

    # ---------------------------------------------------------------------------- the pipeline
    def _fill(self, step: int) -> None:
        """Send requests for the steps from ``step`` (the next to learn) up to ``max_staleness`` ahead,
        never past the stage's end."""
        k = self.stage.train.max_staleness
        while True:
            target = step + len(self.outstanding)  # requests are consumed one step after another
            if target > step + k or target >= self.stage_end:
                return
            self._send(target)

    def _send(self, target: int) -> None:
        t = self.stage.train
        request = Request(self.next_request, self.stream.next_batch(t.prompts_per_step), t.group_size,
                          min_version=target - t.max_staleness, seed=request_seed(self.seed, self.next_request))
        self.next_request += 1
        self.outstanding[request.index] = request
        self.worker.send(request)

    def _result(self, index: int) -> Result:
        """The worker's batch for request ``index``; a dead worker is restarted and asked again."""
        while index not in self.ready:
            message = self.worker.receive(timeout=0.5)
            if message is None:
                if not self.worker.alive:
                    self._restart()
                continue
            self._take(message)
        return self.ready.pop(index)

    def _take(self, message: tuple) -> None:
        if message[0] == "rollouts":
            if message[1].index in self.outstanding:  # anything else was learned from already
                self.ready[message[1].index] = message[1]
        elif message[0] == "error":
            raise ComponentError(message[1])

    def _restart(self) -> None:
        code = self.worker.exitcode
        self.worker.restarts += 1
        if self.worker.restarts > MAX_RESTARTS:
            raise RolloutsUnavailable(f"the rollout worker died {self.worker.restarts} times in this stage "
                                      f"(last exit code {code})")
        pending = sorted(i for i in self.outstanding if i not in self.ready)
        self.worker.stop()
        self.worker.start(self.worker.latest_version)  # the published version carries over
        for i in pending:
            self.worker.send(self.outstanding[i])
        self.message(f"warning: the rollout worker died (exit code {code}); restarted it "
                     f"({self.worker.restarts} of {MAX_RESTARTS}), sampling its {len(pending)} unfinished "
                     "batch(es) again")

    def _drain(self) -> None:
        """Keep whatever the worker already returned (before a checkpoint)."""
        while self.worker is not None and (message := self.worker.receive(timeout=0.01)) is not None:
            self._take(message)

    # ------------------------------------------------------------------------------- metrics
    def _reset_step_stats(self) -> None:
        self.stats: dict[str, Any] = {"staleness": [], "wait_s": 0.0, "worker_idle_s": 0.0, "worker_busy_s": 0.0,
                                      "token_age_sum": 0.0, "tokens": 0, "partial": 0}

    def _count_token_versions(self, rollouts: Rollouts) -> None:
        real = rollouts.completion_mask.bool()
        versions = rollouts.token_versions
        self.stats["token_age_sum"] += float((self.current_step() - versions)[real].sum())
        self.stats["tokens"] += int(real.sum())
        newest = versions.masked_fill(~real, -1).amax(dim=1)
        oldest = versions.masked_fill(~real, 2**62).amin(dim=1)
        self.stats["partial"] += int(((newest > oldest) & real.any(dim=1)).sum())

    def _step_metrics(self) -> dict[str, float]:
        s = self.stats
        ages = s["staleness"] or [0]
        out = {"staleness": sum(ages) / len(ages), "staleness_max": float(max(ages)),
               "rollout_wait_time": s["wait_s"]}
        for k in range(self.stage.train.max_staleness + 1):  # the step's histogram: samples per age
            out[f"staleness_{k}"] = float(sum(1 for a in ages if a == k))
        if s["tokens"]:  # partial rollouts: tokens' mean age, and the share of completions spanning versions
            out["token_staleness"] = s["token_age_sum"] / s["tokens"]
            out["partial_frac"] = s["partial"] / len(ages)
        worker_total = s["worker_idle_s"] + s["worker_busy_s"]
        if worker_total > 0:
            out["worker_idle_frac"] = s["worker_idle_s"] / worker_total
        return out

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The requests not yet learned from and the batches already returned for them."""
        self._drain()
        for request, result in self.taken:  # a step that failed part-way: its batches were not learned from
            self.outstanding[request.index], self.ready[result.index] = request, result
        self.taken = []
        return {
            "next_request": self.next_request,
            "requests": [request_state(self.outstanding[i]) for i in sorted(self.outstanding)],
            "results": [result_state(self.ready[i]) for i in sorted(self.ready)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next_request = int(state["next_request"])
        self.outstanding = {r["index"]: request_from_state(r) for r in state["requests"]}
        self.ready = {r["index"]: result_from_state(r) for r in state["results"]}


# ------------------------------------------------------------------ checkpointable forms
# Checkpoint files are read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and
# dicts only; prompts' info and rollouts' lists travel as JSON.

def request_state(request: Request) -> dict[str, Any]:
    return {"index": request.index, "group_size": request.group_size, "min_version": request.min_version,
            "seed": request.seed, "prompts": json.dumps([dataclasses.asdict(p) for p in request.prompts])}


def request_from_state(state: dict[str, Any]) -> Request:
    return Request(state["index"], [Prompt(**p) for p in json.loads(state["prompts"])], state["group_size"],
                   state["min_version"], state["seed"])


def result_state(result: Result) -> dict[str, Any]:
    r = result.rollouts
    tensors = {name: getattr(r, name) for name in TENSOR_FIELDS if getattr(r, name) is not None}
    lists = json.dumps({name: getattr(r, name) for name in LIST_FIELDS}, default=str)
    return {"index": result.index, "version": result.version, "tensors": tensors, "lists": lists,
            "temperature": r.temperature}


def result_from_state(state: dict[str, Any]) -> Result:
    rollouts = Rollouts(**state["tensors"], **json.loads(state["lists"]), temperature=state["temperature"])
    return Result(state["index"], state["version"], rollouts, idle_s=0.0, busy_s=0.0)
