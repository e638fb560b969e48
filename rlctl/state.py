"""Live training state shared with schedulers and observer hooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainState:
    step: int = 0  # global step about to run / just run (0-based)
    total_steps: int = 0
    stage: str = "main"
    stage_step: int = 0  # step within the current stage
    stage_steps: int = 0
    base_lr: float = 0.0  # the stage's configured peak learning rate
    lr: float = 0.0  # learning rate for the next update; schedulers set it
    output_dir: Path | None = None
    components: dict[str, Any] = field(default_factory=dict)  # kind -> component of this stage
    recipe: Any = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    rollouts: Any = None  # this process's last trained batch (Rollouts), for observers
