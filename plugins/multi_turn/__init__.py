"""Multi-turn and tool-use rollouts: the ``multi_turn`` and ``multi_turn_demonstrations`` samplers, the
``tools`` environment (built-in ``calculator`` and ``python`` tools) and the ``env_return`` reward.

What rewards see of a trajectory: ``completions[i]`` is the policy's last turn (its answer, so answer
rewards such as ``math_verify`` work unchanged); ``info[i]`` holds ``trajectory`` (the whole text after the
prompt, observations included), ``turn_texts``, ``observations``, ``turns``, ``tool_calls``,
``tool_errors`` (and ``tool_error/<kind>``), ``tool_time``, ``stop_reason``, ``truncated``, ``env_return``
(the environment's per-turn rewards, summed or discounted by ``discount``) and ``failed`` (the error of an
environment that crashed: the trainer scores that trajectory 0).
"""

from __future__ import annotations

import torch

from rlctl.hookspecs import hookimpl
from rlctl.rollouts import Rollouts

from .sampler import MultiTurnDemonstrations, MultiTurnSampler
from .tool_env import ToolEnvironment


class EnvReturnReward:
    """The environment's own reward of each trajectory: ``info["env_return"]``."""

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return torch.tensor([float(i.get("env_return", 0.0)) for i in rollouts.info], dtype=torch.float32)


@hookimpl
def rlctl_register_samplers(register):
    register("multi_turn", MultiTurnSampler)
    register("multi_turn_demonstrations", MultiTurnDemonstrations)


@hookimpl
def rlctl_register_environments(register):
    register("tools", ToolEnvironment)


@hookimpl
def rlctl_register_rewards(register):
    register("env_return", EnvReturnReward)
