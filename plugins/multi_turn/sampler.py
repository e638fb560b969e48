"""The ``multi_turn`` sampler: the policy and an environment take turns, token-exact; and
``multi_turn_demonstrations``, which replays demonstrated turns through the same environment (SFT).

A trajectory is the prompt, then the policy's tokens exactly as sampled, each turn followed by the
environment's observation rendered as a chat-template segment (``chat.ChatFormat``). Nothing is decoded
and re-encoded, so the tokens trained on are the tokens sampled and their behaviour log-probs are those
of the decoding step. ``loss_mask`` is 1 on the policy's tokens only.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from rlctl import plugins
from rlctl.environments import Environment, Step, Turn, reset, tools_of
from rlctl.errors import PluginError
from rlctl.models import Policy
from rlctl.models.continuation import continue_contexts
from rlctl.rollouts import Prompt, Rollouts
from rlctl.signature import check_call

from .chat import ChatFormat
from .trajectory import Trajectory, batch_metrics, to_rollouts


def resolve_environment(env: dict[str, Any]) -> tuple[str, Callable[[], Any]]:
    """(name, a function that builds one environment) from a ``[sampler.env]`` table, checked."""
    if not isinstance(env, dict) or not isinstance(env.get("use"), str):
        raise ValueError('[sampler.env] needs use = "<environment>" (e.g. use = "tools"); environments: '
                         + ", ".join(plugins.available("environment")))
    options = {k: v for k, v in env.items() if k != "use"}
    try:
        component = plugins.registry().get("environment", env["use"])
    except PluginError as exc:
        raise ValueError(f"[sampler.env] use = {env['use']!r}: {exc}") from None
    problems: list[str] = []
    kwargs = check_call(component.factory, options, "sampler.env", problems)
    if problems:
        raise ValueError("; ".join(problems))
    try:
        probe = component.factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"[sampler.env] use = {env['use']!r}: {exc}") from None
    if not isinstance(probe, Environment):
        raise ValueError(f"[sampler.env] use = {env['use']!r} (plugin {component.plugin}): the environment "
                         "has no step(turn) method")
    return env["use"], lambda: component.factory(**kwargs)


class _TrajectorySampler:
    """What both samplers share: the environment, the chat format, limits, assembly and metrics."""

    def __init__(self, env: dict[str, Any], max_turns: int, max_turn_tokens: int, max_total_tokens: int,
                 max_tool_time: float, chat_template: bool, observation_role: str, system_prompt: str,
                 discount: float, max_env_failure_rate: float, workers: int, describe_tools: bool = True):
        for key, value, low in (("max_turns", max_turns, 1), ("max_turn_tokens", max_turn_tokens, 1),
                                ("max_total_tokens", max_total_tokens, 1)):
            if value < low:
                raise ValueError(f"{key} = {value}: accepted values are >= {low}")
        if max_tool_time <= 0:
            raise ValueError(f"max_tool_time = {max_tool_time}: accepted values are > 0 seconds")
        if not 0 <= discount <= 1:
            raise ValueError(f"discount = {discount}: accepted values are in [0, 1]")
        if not 0 <= max_env_failure_rate <= 1:
            raise ValueError(f"max_env_failure_rate = {max_env_failure_rate}: accepted values are in [0, 1]")
        if workers < 0:
            raise ValueError(f"workers = {workers}: accepted values are >= 0 (0: one per CPU, at most 8)")
        self.env_name, self.make_env = resolve_environment(env)
        self.max_turns, self.max_turn_tokens, self.max_total_tokens = max_turns, max_turn_tokens, max_total_tokens
        self.max_tool_time = max_tool_time
        self.chat_template, self.observation_role = chat_template, observation_role
        self.system_prompt = system_prompt or None
        self.discount, self.max_env_failure_rate = discount, max_env_failure_rate
        self.workers = workers or min(8, os.cpu_count() or 1)
        self.describe_tools = describe_tools
        self._formats: dict[int, ChatFormat] = {}

    def chat_format(self, tokenizer: Any) -> ChatFormat:
        key = id(tokenizer)
        if key not in self._formats:
            self._formats[key] = ChatFormat(tokenizer, self.chat_template, self.observation_role, self.system_prompt)
        return self._formats[key]

    # ---------------------------------------------------------------------------- trajectories
    def start(self, fmt: ChatFormat, prompts: Sequence[Prompt], group_size: int) -> list[Trajectory]:
        trajectories = []
        for prompt in prompts:
            for _ in range(group_size):
                trajectory = Trajectory(prompt=prompt, prompt_ids=[])
                try:
                    trajectory.environment = self.make_env()
                    reset(trajectory.environment, prompt)
                    tools = tools_of(trajectory.environment)
                except Exception as exc:  # the environment's failure: this trajectory only
                    self.fail(trajectory, exc)
                    tools = ()
                trajectory.prompt_ids = fmt.prompt_ids(prompt.text, tools if self.describe_tools else ())
                trajectories.append(trajectory)
        return trajectories

    def fail(self, trajectory: Trajectory, exc: BaseException) -> None:
        trajectory.failed = f"{type(exc).__name__}: {exc}"[:500]
        trajectory.stop("env_error")

    def react(self, fmt: ChatFormat, pairs: list[tuple[Trajectory, Turn]]) -> None:
        """Every environment's step for its turn (in threads: tools may wait on programs), then the
        observation or the limit that ends the trajectory."""
        def one(pair: tuple[Trajectory, Turn]) -> Step | BaseException:
            try:
                step = pair[0].environment.step(pair[1])
                if not isinstance(step, Step):
                    raise TypeError(f"step() returned {type(step).__name__}, not rlctl.environments.Step")
                return step
            except Exception as exc:
                return exc

        if self.workers > 1 and len(pairs) > 1:
            with ThreadPoolExecutor(min(self.workers, len(pairs))) as pool:
                steps = list(pool.map(one, pairs))
        else:
            steps = [one(p) for p in pairs]
        for (trajectory, turn), step in zip(pairs, steps):
            if isinstance(step, BaseException):
                self.fail(trajectory, step)
                continue
            trajectory.rewards.append(float(step.reward))
            trajectory.add_info(step.info)
            if step.done:
                trajectory.stop("done")
            elif turn.index + 1 >= self.max_turns:
                trajectory.stop("max_turns")
            elif trajectory.counts.get("tool_time", 0.0) > self.max_tool_time:
                trajectory.stop("max_tool_time")
            else:
                observation = "" if step.observation is None else str(step.observation)
                ids = fmt.observation_ids(observation, turn.finished)
                if len(trajectory.ids) + len(ids) >= self.max_total_tokens:
                    trajectory.stop("max_total_tokens")  # no room for the observation and a reply
                else:
                    trajectory.add_observation(ids, observation)

    def finish(self, policy: Policy, trajectories: list[Trajectory], group_size: int, temperature: float) -> Rollouts:
        failed = [t for t in trajectories if t.failed is not None]
        if failed and len(failed) > self.max_env_failure_rate * len(trajectories):
            raise RuntimeError(f"environment {self.env_name!r} failed in {len(failed)} of {len(trajectories)} "
                               f"trajectories, above [sampler] max_env_failure_rate = {self.max_env_failure_rate}; "
                               f"last error: {failed[-1].failed}")
        tok = policy.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        return to_rollouts(trajectories, group_size, pad, policy.device, temperature, self.discount,
                           lambda ids: tok.decode(ids, skip_special_tokens=False))

    @staticmethod
    def turn_text(tokenizer: Any, ids: Sequence[int], finished: bool) -> str:
        """A turn's text for the environment: special tokens kept (a template's ``<tool_call>`` may be
        one) except the EOS that ended it."""
        body = list(ids[:-1]) if finished else list(ids)
        return tokenizer.decode(body, skip_special_tokens=False)

    def batch_metrics(self, rollouts: Rollouts) -> dict[str, float]:
        return batch_metrics(rollouts.info)


class MultiTurnSampler(_TrajectorySampler):
    """``group_size`` trajectories per prompt, the policy and ``env`` taking turns.

    A turn ends at EOS or after ``max_turn_tokens``; a trajectory at the environment's ``done`` or at a
    limit: ``max_turns`` policy turns, ``max_total_tokens`` tokens after the prompt (turns and
    observations), ``max_tool_time`` seconds of tool calls. ``info["stop_reason"]`` says which, and
    ``info["truncated"]`` is True unless the environment ended it.
    """

    supports_partial_rollouts = False  # the environment's steps happen between decoding calls
    provides = ("behavior_logprobs", "loss_mask")

    def __init__(self, env: dict[str, Any], max_turns: int = 4, max_turn_tokens: int = 128,
                 max_total_tokens: int = 512, max_tool_time: float = 30.0, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, chat_template: bool = True, observation_role: str = "tool",
                 system_prompt: str = "", discount: float = 1.0, max_env_failure_rate: float = 0.25,
                 workers: int = 0, describe_tools: bool = True):
        if temperature <= 0:
            raise ValueError(f"temperature = {temperature}: must be > 0 (sampling is required for RL)")
        if not 0 < top_p <= 1 or top_k < 0:
            raise ValueError("top_p must be in (0, 1] and top_k >= 0")
        super().__init__(env, max_turns, max_turn_tokens, max_total_tokens, max_tool_time, chat_template,
                         observation_role, system_prompt, discount, max_env_failure_rate, workers, describe_tools)
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def sample(self, policy: Policy, prompts: Sequence[Prompt], group_size: int) -> Rollouts:
        return self.run(policy, prompts, group_size, do_sample=True)

    def sample_greedy(self, policy: Policy, prompts: Sequence[Prompt]) -> Rollouts:
        """One greedy trajectory per prompt (evaluation)."""
        return self.run(policy, prompts, 1, do_sample=False)

    def run(self, policy: Policy, prompts: Sequence[Prompt], group_size: int, do_sample: bool) -> Rollouts:
        from rlctl.models.generation import in_lockstep

        if in_lockstep():
            # a sharded model decodes in lockstep, but each process's trajectories take their own
            # number of turns: the processes' decoding calls would not match
            raise ValueError("[sampler] use = \"multi_turn\" does not run with a sharded model ([train] "
                             "engine = \"fsdp2\") yet; use one process or DDP")
        fmt = self.chat_format(policy.tokenizer)
        trajectories = self.start(fmt, prompts, group_size)
        sampling = {"do_sample": do_sample, "temperature": self.temperature, "top_p": self.top_p,
                    "top_k": self.top_k}
        for index in range(self.max_turns):
            live = [t for t in trajectories if t.running]
            if not live:
                break
            budgets = [min(self.max_turn_tokens, self.max_total_tokens - len(t.ids)) for t in live]
            if index == 0 and group_size > 1 and len(live) == len(trajectories) and _groups_share_prompts(
                    trajectories, group_size):
                # the first turn of a group continues one prompt: prefill it once for the group
                contexts = [trajectories[i].prompt_ids for i in range(0, len(trajectories), group_size)]
                outs = continue_contexts(policy, contexts, max_new_tokens=budgets, group_size=group_size, **sampling)
            else:
                outs = continue_contexts(policy, [t.prompt_ids + t.ids for t in live], max_new_tokens=budgets,
                                         **sampling)
            pairs = []
            for t, out in zip(live, outs):
                text = self.turn_text(policy.tokenizer, out.token_ids, out.finished)
                t.add_turn(out.token_ids, out.logprobs, text, out.finished)
                pairs.append((t, Turn(index=index, text=text, token_ids=list(out.token_ids), finished=out.finished)))
            self.react(fmt, pairs)
        for t in trajectories:
            t.stop("max_turns")
        return self.finish(policy, trajectories, group_size, self.temperature if do_sample else 1.0)


def _groups_share_prompts(trajectories: list[Trajectory], group_size: int) -> bool:
    return all(trajectories[i].prompt_ids == trajectories[i - i % group_size].prompt_ids
               for i in range(len(trajectories)))


class MultiTurnDemonstrations(MultiTurnSampler):
    """Demonstrated turns (``info[turns_key]``: the assistant's turns as text) replayed through ``env``:
    the observations are the environment's real ones, rendered exactly as in ``multi_turn``, so that an
    SFT warm-up trains on the token layout RL will sample. Each demonstrated turn is encoded and ended
    with EOS. Evaluation (``sample_greedy``) runs the policy multi-turn, like ``multi_turn``."""

    deterministic = True  # the completions come from the data: reference log-probs are cached
    provides = ("loss_mask",)

    def __init__(self, env: dict[str, Any], turns_key: str = "demo_turns", max_turns: int = 4,
                 max_turn_tokens: int = 128, max_total_tokens: int = 512, max_tool_time: float = 30.0,
                 chat_template: bool = True, observation_role: str = "tool", system_prompt: str = "",
                 max_env_failure_rate: float = 0.25, workers: int = 0, describe_tools: bool = True):
        super().__init__(env, max_turns=max_turns, max_turn_tokens=max_turn_tokens, max_total_tokens=max_total_tokens,
                         max_tool_time=max_tool_time, chat_template=chat_template,
                         observation_role=observation_role, system_prompt=system_prompt,
                         max_env_failure_rate=max_env_failure_rate, workers=workers, describe_tools=describe_tools)
        self.turns_key = turns_key

    def sample(self, policy: Policy, prompts: Sequence[Prompt], group_size: int) -> Rollouts:
        tok = policy.tokenizer
        fmt = self.chat_format(tok)
        demos = []
        for p in prompts:
            turns = p.info.get(self.turns_key)
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError(f"prompt {p.text[:40]!r}: info[{self.turns_key!r}] must be a list of the "
                                 "assistant's turns (strings)")
            demos.append(turns)
        trajectories = self.start(fmt, prompts, 1)
        for index in range(max(len(d) for d in demos)):
            pairs = []
            for t, turns in zip(trajectories, demos):
                if not t.running:
                    continue
                if index >= len(turns):
                    t.stop("demonstration_end")
                    continue
                ids = list(tok(turns[index], add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
                t.add_turn(ids, None, turns[index], True)
                pairs.append((t, Turn(index=index, text=turns[index], token_ids=ids, finished=True)))
            self.react(fmt, pairs)
        for t in trajectories:
            t.stop("demonstration_end")
        return self.finish(policy, trajectories, 1, 1.0)
