"""One trajectory being built, token by token as sampled, and a batch of them as ``Rollouts``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rlctl.rollouts import Prompt, Rollouts, right_pad


@dataclass
class Trajectory:
    prompt: Prompt
    prompt_ids: list[int]
    environment: Any = None
    ids: list[int] = field(default_factory=list)  # everything after the prompt: turns and observations
    policy: list[int] = field(default_factory=list)  # 1 where the policy sampled the token
    logprobs: list[float] = field(default_factory=list)  # behaviour log-probs (0 on observation tokens)
    turn_texts: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # per turn, from the environment
    counts: dict[str, float] = field(default_factory=dict)  # summed from each step's info
    extra: dict[str, Any] = field(default_factory=dict)  # other step info (last value wins)
    stop_reason: str | None = None  # None while running; "done" or the limit that ended it
    failed: str | None = None  # the environment's error, when it crashed
    sampled: bool = True  # every policy token has its behaviour log-prob (False: demonstrations)
    last_finished: bool = True  # the last turn ended with EOS (not cut by a token limit)

    @property
    def running(self) -> bool:
        return self.stop_reason is None

    def add_turn(self, ids: Sequence[int], logprobs: Sequence[float] | None, text: str, finished: bool) -> None:
        self.ids += ids
        self.policy += [1] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
        self.sampled = self.sampled and logprobs is not None
        self.last_finished = finished
        self.turn_texts.append(text)

    def add_observation(self, ids: Sequence[int], text: str) -> None:
        self.ids += ids
        self.policy += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.observations.append(text)

    def add_info(self, info: dict[str, Any]) -> None:
        for key, value in info.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.counts[key] = self.counts.get(key, 0.0) + float(value)
            else:
                self.extra[key] = value

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def env_return(self, discount: float) -> float:
        """Per-turn rewards discounted back to the first turn: sum_k discount^k r_k."""
        return float(sum(r * discount**k for k, r in enumerate(self.rewards)))

    def info(self, discount: float) -> dict[str, Any]:
        out = {"answer": self.prompt.answer, **self.prompt.info, **self.extra, **self.counts,
               "turns": len(self.turn_texts), "turn_texts": list(self.turn_texts),
               "observations": list(self.observations), "stop_reason": self.stop_reason,
               # a limit ended it, or cut its last turn before EOS
               "truncated": self.stop_reason not in ("done", "demonstration_end") or not self.last_finished,
               "env_return": self.env_return(discount)}
        out.setdefault("tool_calls", 0.0)
        out.setdefault("tool_errors", 0.0)
        if self.failed is not None:
            out["failed"] = self.failed
        return out


def to_rollouts(trajectories: Sequence[Trajectory], group_size: int, pad_token_id: int, device: Any,
                temperature: float, discount: float, decode: Any) -> Rollouts:
    """Left-padded prompts, right-padded trajectories; ``loss_mask`` marks the policy's tokens."""
    width = max(1, max(len(t.prompt_ids) for t in trajectories))
    prompt_ids = torch.full((len(trajectories), width), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(trajectories), width), dtype=torch.long)
    for i, t in enumerate(trajectories):
        if t.prompt_ids:
            prompt_ids[i, width - len(t.prompt_ids):] = torch.tensor(t.prompt_ids)
            prompt_mask[i, width - len(t.prompt_ids):] = 1
    ids, mask = right_pad([t.ids for t in trajectories], pad_token_id)
    loss_mask, _ = right_pad([t.policy for t in trajectories], 0)
    loss_mask = loss_mask * mask
    behavior = torch.zeros(ids.shape, dtype=torch.float32)
    for i, t in enumerate(trajectories):
        behavior[i, :len(t.logprobs)] = torch.tensor(t.logprobs, dtype=torch.float32)
    n_prompts = len(trajectories) // group_size
    return Rollouts(
        prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
        completion_ids=ids.to(device), completion_mask=mask.to(device),
        group_ids=torch.arange(n_prompts, device=device).repeat_interleave(group_size),
        prompts=[t.prompt.text for t in trajectories],
        # the completion text rewards read is the policy's last turn: its answer (the whole trajectory,
        # observations included, is in info["trajectory"])
        completions=[t.turn_texts[-1] if t.turn_texts else "" for t in trajectories],
        info=[dict(t.info(discount), trajectory=decode(t.ids)) for t in trajectories],
        temperature=temperature,
        behavior_logprobs=behavior.to(device) if all(t.sampled for t in trajectories) else None,
        loss_mask=loss_mask.to(device),
    )


def batch_metrics(infos: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Tool use and limits over a batch of trajectories (logged every step, and at evaluation)."""
    n = max(1, len(infos))
    calls = sum(float(i.get("tool_calls", 0.0)) for i in infos)
    errors = sum(float(i.get("tool_errors", 0.0)) for i in infos)
    out = {"turns": sum(i.get("turns", 0) for i in infos) / n,
           "tool_call_rate": sum(float(i.get("tool_calls", 0.0)) > 0 for i in infos) / n,
           "tool_calls": calls / n,
           "tool_error_rate": errors / calls if calls else 0.0,
           "env_failures": float(sum("failed" in i for i in infos)),
           "truncated_frac": sum(bool(i.get("truncated")) for i in infos) / n}
    kinds = {k for i in infos for k in i if k.startswith("tool_error/")}
    for kind in sorted(kinds):
        out[kind] = sum(float(i.get(kind, 0.0)) for i in infos)
    return out
