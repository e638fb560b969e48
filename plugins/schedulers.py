"""Learning-rate schedules over a stage: constant, linear and cosine, each with linear warm-up."""

from __future__ import annotations

import math

from rlctl.hookspecs import hookimpl


class _WarmupSchedule:
    def __init__(self, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps = {warmup_steps}: must be >= 0")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio = {min_lr_ratio}: must be in [0, 1]")
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio

    def factor(self, progress: float) -> float:  # progress in [0, 1] after warm-up
        raise NotImplementedError

    def step(self, state) -> None:
        s = state.stage_step
        if s < self.warmup_steps:
            state.lr = state.base_lr * (s + 1) / self.warmup_steps
            return
        span = max(1, state.stage_steps - self.warmup_steps)
        progress = min(1.0, (s - self.warmup_steps) / span)
        state.lr = state.base_lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * self.factor(progress))


class ConstantSchedule(_WarmupSchedule):
    """The stage's ``lr`` throughout (after an optional linear warm-up)."""

    def factor(self, progress: float) -> float:
        return 1.0


class LinearSchedule(_WarmupSchedule):
    """Linear decay from ``lr`` to ``min_lr_ratio * lr`` over the stage."""

    def factor(self, progress: float) -> float:
        return 1.0 - progress


class CosineSchedule(_WarmupSchedule):
    """Cosine decay from ``lr`` to ``min_lr_ratio * lr`` over the stage (half way: half the peak)."""

    def factor(self, progress: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * progress))


@hookimpl
def rlctl_register_schedulers(register):
    register("constant", ConstantSchedule)
    register("linear", LinearSchedule)
    register("cosine", CosineSchedule)
