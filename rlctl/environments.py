"""Environments: what a multi-turn sampler talks to between the policy's turns.

An environment is registered like every other component (``rlctl_register_environments`` in
``rlctl.hookspecs``) and selected inside a multi-turn sampler's table::

    [sampler]
    use = "multi_turn"
    max_turns = 4

    [sampler.env]
    use = "tools"                 # a registered environment
    tools = ["calculator"]        # its options, checked against the factory's signature

The factory is called once per trajectory (``factory(**options)``), so an environment may keep the
state of one episode in ``self``. The sampler then

1. calls ``reset(prompt)`` (optional) with the task instance;
2. decodes the policy's turn (until EOS or a limit) and calls ``step(turn)`` with its exact tokens and
   their text;
3. appends the returned observation, rendered once as a chat-template segment (a message of role
   ``observation_role``) and never re-tokenised from decoded text, and goes on until ``done`` or a limit.

Rewards per turn (``Step.reward``) are summed, or discounted, into ``info["env_return"]`` of the
trajectory (the ``env_return`` reward reads it); a recipe's other rewards see the final turn as the
completion text and the whole trajectory in ``info`` (see ``rlctl_plugins.multi_turn``).

An exception raised by the environment fails that trajectory only: it ends there, scores 0 and is
counted; the run stops when more than the sampler's ``max_env_failure_rate`` of a batch fails.

Tools are an environment's callable helpers: ``tools`` (optional) lists ``Tool`` objects, which the
sampler describes to the model (through the chat template where it supports tools, otherwise in the
``<tool_call>{json}</tool_call>`` tag format). The built-in ``tools`` environment runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from rlctl.rollouts import Prompt


@dataclass
class Turn:
    """One turn of the policy, as sampled."""

    index: int  # 0 for the first turn
    text: str  # the turn's tokens decoded, special tokens skipped
    token_ids: list[int]  # exactly the tokens sampled (ending with EOS unless a limit cut the turn)
    finished: bool  # the turn ended with EOS (False: cut by the turn or trajectory token limit)


@dataclass
class Step:
    """What the environment answers to a turn."""

    observation: str | None = None  # shown to the policy next (ignored when done)
    done: bool = False
    reward: float = 0.0  # this turn's reward, summed or discounted into info["env_return"]
    info: dict[str, Any] = field(default_factory=dict)  # merged into the trajectory's info (counts add up)


@dataclass
class Tool:
    """A function the policy may call: ``call(**arguments) -> str`` (the text shown as the result)."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    call: Callable[..., str]
    timeout: float | None = None  # seconds; None: the environment's default

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style function description that chat templates with tool support render."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@runtime_checkable
class Environment(Protocol):
    def step(self, turn: Turn) -> Step:
        """React to the policy's turn: the next observation, or done."""
        ...


def reset(environment: Any, prompt: Prompt) -> None:
    """Start an episode (``reset`` is optional)."""
    start = getattr(environment, "reset", None)
    if start is not None:
        start(prompt)


def tools_of(environment: Any) -> Sequence[Tool]:
    return tuple(getattr(environment, "tools", ()) or ())
