"""The rlctl plugin contract.

Every plugin, built-in or third-party, is a module (or object) with functions marked ``@hookimpl``.
Third-party packages are found through the ``rlctl`` entry-point group::

    [project.entry-points.rlctl]
    my_plugin = "my_package.plugin"

**Registration hooks** (one per component kind) are called once, when plugins load. Each receives a
``register(name, factory)`` callable; call it once per component you provide. ``factory(**options)``
must build the component from the keyword options of the recipe table that selects it by ``use = name``,
so type-annotate its parameters: the recipe is checked against that signature before any model loads.
A name registered twice is an error that names both owners.

**Observer hooks** are called on every plugin that implements them (pluggy's call-all semantics), in
the training process, with the live ``TrainState``. Their return values are ignored.

The component protocols (what a factory must return) are documented in ``rlctl.components``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import pluggy

if TYPE_CHECKING:  # imports for annotations only: keep this module free of heavy imports
    from rlctl.state import TrainState

hookspec = pluggy.HookspecMarker("rlctl")
hookimpl = pluggy.HookimplMarker("rlctl")

Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def rlctl_register_samplers(register: Register) -> None:
    """Register samplers: ``sample(policy, prompts, group_size) -> Rollouts``."""


@hookspec
def rlctl_register_rewards(register: Register) -> None:
    """Register rewards: ``score(rollouts) -> Tensor[N]`` (outcome) or ``Tensor[N, T]`` (process)."""


@hookspec
def rlctl_register_advantages(register: Register) -> None:
    """Register advantage estimators: ``compute(rollouts) -> Tensor[N, T]``."""


@hookspec
def rlctl_register_losses(register: Register) -> None:
    """Register losses: ``compute(rollouts, logprobs, **extra) -> (loss, stats)``."""


@hookspec
def rlctl_register_schedulers(register: Register) -> None:
    """Register schedulers: ``step(state) -> None``, called before every update."""


@hookspec
def rlctl_register_environments(register: Register) -> None:
    """Register environments for multi-turn samplers: ``step(turn) -> Step`` (see ``rlctl.environments``)."""


@hookspec
def rlctl_on_run_start(state: TrainState) -> None:
    """Called once, after models and components are built and before the first step."""


@hookspec
def rlctl_on_step_start(state: TrainState) -> None:
    """Called at the start of every training step (``state.step`` is the step about to run)."""


@hookspec
def rlctl_on_step_end(state: TrainState, metrics: Mapping[str, float]) -> None:
    """Called after every training step with the metrics written to ``metrics.jsonl``."""


@hookspec
def rlctl_on_run_end(state: TrainState, summary: Mapping[str, float]) -> None:
    """Called once when the run ends normally, with the final summary metrics."""
