"""Component protocols: what the factory registered under a name must return.

Components never call each other; the trainer moves one ``Rollouts`` through them in order
sampler -> rewards -> advantage -> loss, and calls the scheduler before every update.

Any component may declare ``requires``: the names of data it needs the trainer to provide, checked
before the run starts. Recognised names:

``ref_logprobs``      log-probs of a frozen reference model (loads one; absent otherwise)
``old_logprobs``      log-probs of the policy before this batch's updates
``behavior_logprobs`` log-probs recorded by the sampler (the sampler must provide them)
``values``            a value head on the policy: ``rollouts.values`` before the update and
                      ``values=`` (new values, with gradient) passed to the loss
``entropy``           per-token entropy passed to the loss as ``entropy=``
``rewards``           ``rollouts.rewards`` from the recipe's ``[[reward]]`` tables
``advantages``        ``rollouts.advantages`` from the recipe's ``[advantage]`` (implies rewards
                      where the advantage estimator requires them)

The trainer only computes what some component requires: an SFT loss that requires nothing gets no
rewards, no advantages and no reference model.

A sampler lists in ``provides`` the optional ``Rollouts`` fields it fills (e.g. ``behavior_logprobs``),
so that a loss requiring them is rejected before the run when the sampler cannot supply them.
Samplers set ``info[i]["truncated"]`` to True for a completion cut at the token limit (no EOS).

Samplers that select prompts may set ``candidates_per_prompt = k``: the trainer then passes ``k`` times
``prompts_per_step`` candidate prompts and the sampler returns completions for the ones it picks (each
group's ``group_ids`` must be distinct). A sampler with an ``observe(rollouts)`` method is shown every
scored batch (``rewards`` set), of all processes, before dynamic sampling drops any group (e.g. to
update per-prompt statistics).

Asynchronous rollouts (``[train] max_staleness >= 1``) run the sampler in a worker process: a sampler
that cannot run there (it drives an engine owned by the learner's process) sets ``runs_in_worker =
False``. A sampler that decodes token by token and can switch weights part-way through a completion
sets ``supports_partial_rollouts = True`` and calls ``policy.refresh()`` between decoding steps (it
returns the version loaded; see ``rlctl.models.Policy``), filling ``token_versions``.

A sampler whose completions take several decoding calls (multi-turn) provides ``sample_greedy(policy,
prompts) -> Rollouts`` (one greedy completion per prompt), which evaluation then uses instead of plain
greedy decoding, and may provide ``batch_metrics(rollouts) -> dict[str, float]``, logged every step (and
as ``eval/<name>`` at evaluation). A sampler marks a rollout that failed (e.g. its environment crashed)
with ``info[i]["failed"] = "<error>"``: the trainer scores it 0.

A sampler whose completions depend only on the prompt (no generation: demonstrations, preference
pairs) sets ``deterministic = True``; the trainer then computes reference log-probs once per
(prompt, completion) and stage, and reuses them in later epochs.

Losses run on micro-batches. ``rollouts.totals`` holds counts over the whole mini-batch of every
process: ``tokens`` (of ``loss_mask``, else ``completion_mask``) and ``sequences``, plus whatever the
loss's optional ``totals(rollouts) -> dict[str, float]`` returns (counts that add up over batches, e.g.
``pairs``, or the tokens of a second term). Normalise by them (``rlctl.ops.aggregate(...,
totals=rollouts.totals)``, ``rlctl.ops.batch_mean``) and return the micro-batch's share of the
mini-batch loss: the trainer adds the shares, so the gradient does not depend on ``micro_batch_size``,
the number of processes or padding. ``rollouts.totals`` is None when a loss is called outside the
trainer; the helpers then use the batch's own counts.

Components that keep state across steps (e.g. prompt statistics) implement ``state_dict()`` and
``load_state_dict(state)`` so that checkpoints resume them exactly.
"""

from __future__ import annotations

from typing import Any, Collection, Protocol, Sequence, runtime_checkable

import torch

from rlctl.rollouts import Prompt, Rollouts

KNOWN_REQUIREMENTS = frozenset(
    {"ref_logprobs", "old_logprobs", "behavior_logprobs", "values", "entropy", "rewards", "advantages"}
)


@runtime_checkable
class Sampler(Protocol):
    def sample(self, policy: Any, prompts: Sequence[Prompt], group_size: int) -> Rollouts:
        """Generate ``group_size`` completions per prompt; ``policy`` is a ``rlctl.models.Policy``."""
        ...


@runtime_checkable
class Reward(Protocol):
    def score(self, rollouts: Rollouts) -> torch.Tensor:
        """One score per completion ``[N]``, or per token ``[N, T]``."""
        ...


@runtime_checkable
class Advantage(Protocol):
    def compute(self, rollouts: Rollouts) -> torch.Tensor:
        """Per-token advantages ``[N, T]`` (zero where ``completion_mask`` is zero)."""
        ...


@runtime_checkable
class Loss(Protocol):
    def compute(
        self, rollouts: Rollouts, logprobs: torch.Tensor, **extra: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss to minimise and float statistics for the metrics log."""
        ...


@runtime_checkable
class Scheduler(Protocol):
    def step(self, state: Any) -> None:
        """Set ``state.lr`` (and any coefficients) for the update about to run."""
        ...


PROTOCOLS: dict[str, type] = {
    "sampler": Sampler,
    "reward": Reward,
    "advantage": Advantage,
    "loss": Loss,
    "scheduler": Scheduler,
}


def requirements(component: Any) -> Collection[str]:
    return tuple(getattr(component, "requires", ()) or ())


def stage_needs(built: dict[str, Any]) -> set[str]:
    """What the trainer must compute for a stage's components (kind -> component).

    The advantage estimator's own requirements count only when something needs advantages.
    """
    needs = set(requirements(built.get("sampler"))) | set(requirements(built.get("loss")))
    if "advantages" in needs:
        needs |= set(requirements(built.get("advantage")))
    return needs
