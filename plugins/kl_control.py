"""Adaptive KL coefficient ("Fine-Tuning Language Models from Human Preferences"), for both placements of
the KL to the reference: in the reward (``gae``) and in the loss (``ppo_clip`` and its relatives).

After each step the coefficient moves toward the value that keeps the measured KL at ``kl_target``:

    e = clip(KL / kl_target - 1, -0.2, 0.2),   coef <- coef * (1 + e * n / kl_horizon)

with n the number of completions of the step (the paper's K_beta = 0.1 is n / kl_horizon = 0.1, e.g.
``kl_horizon = 10 * batch size``; TRL and verl use this n / horizon form). The KL is the step's mean
per-token estimate with the component's ``kl_estimator``.

Why state on the component and not a scheduler: a stage has one scheduler, which sets the learning rate;
an adaptive KL must combine with any learning-rate schedule, and its coefficient belongs to the component
that applies it (and is saved with it in checkpoints, through its ``state_dict``).

* In the reward, ``gae`` measures KL(pi_old || pi_ref) on the whole batch while computing advantages (the
  same value on every process) and updates its coefficient right after using it.
* In the loss, the loss logs its KL per micro-batch; the ``rlctl_on_step_end`` hook below reads the step's
  ``kl`` metric (averaged over micro-batches and processes, so every process sees the same value) and
  updates the coefficient for the next step.
"""

from __future__ import annotations

from typing import Any, Mapping

from rlctl.hookspecs import hookimpl

# the proportional error is clipped to this range (the paper's and the peers' value)
ERROR_CLIP = 0.2


class AdaptiveKLController:
    """coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, init_coef: float, target: float, horizon: float):
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, kl: float, n_steps: float) -> float:
        error = min(max(kl / self.target - 1.0, -ERROR_CLIP), ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "kl_coef" in state:
            self.value = float(state["kl_coef"])


def make_controller(kl_coef: float, kl_target: float, kl_horizon: float) -> AdaptiveKLController | None:
    """The controller for a component's ``kl_coef`` / ``kl_target`` / ``kl_horizon`` keys (None: a fixed
    coefficient), with one-line errors naming the bad key."""
    if kl_target < 0:
        raise ValueError(f"kl_target = {kl_target}: accepted values are 0 (fixed kl_coef) or > 0")
    if kl_horizon <= 0:
        raise ValueError(f"kl_horizon = {kl_horizon}: accepted values are > 0")
    if not kl_target:
        return None
    if kl_coef <= 0:
        raise ValueError(f"kl_target = {kl_target} needs kl_coef > 0 (the initial coefficient); got {kl_coef}")
    return AdaptiveKLController(kl_coef, kl_target, kl_horizon)


@hookimpl
def rlctl_on_step_end(state: Any, metrics: Mapping[str, float]) -> None:
    """Update the loss's adaptive KL coefficient from the step's logged KL."""
    loss = (getattr(state, "components", None) or {}).get("loss")
    controller = getattr(loss, "kl_controller", None)
    if controller is None or "kl" not in metrics:  # a skipped update logs no KL: keep the coefficient
        return
    controller.update(float(metrics["kl"]), float(metrics.get("samples", 0.0)))
