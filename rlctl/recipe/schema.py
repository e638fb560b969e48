"""The recipe schema: the typed sections a recipe is read into, and the names of its sections.

Layout of a recipe (see docs/recipes.md)::

    include = "base.toml"             # optional: deep-merged under this file
    [model]  [data]  [train]  [eval]  # core sections (dataclasses below)
    [sampler] [[reward]] [advantage] [loss] [scheduler]   # components: use = "name", options...
    [[stage]]                         # optional: consecutive stages overriding the sections above
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

COMPONENT_SECTIONS = ("sampler", "reward", "advantage", "loss", "scheduler")
CORE_SECTIONS = ("model", "data", "train", "eval")
TOP_LEVEL_KEYS = ("include", "stage", *CORE_SECTIONS, *COMPONENT_SECTIONS)


# ------------------------------------------------------------------------------- core sections
@dataclass
class ModelConfig:
    name: str = ""  # hub name or local directory (for `tiny`: where to build it; empty = cache)
    tiny: dict | None = None  # build a tiny random model: arch, hidden_size, num_layers, num_heads ...
    lora: dict | None = None  # LoRA adapters (peft): r, alpha, dropout, target_modules, save
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    trust_remote_code: bool = False
    revision: str | None = None
    # a GGUF file (a path, or "package:file.gguf" inside an installed Python package), converted once
    # into the rlctl cache; with `name` also given, a file name inside that directory or hub repository
    gguf_file: str | None = None


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 1e-6
    prompts_per_step: int = 8
    group_size: int = 8
    ppo_epochs: int = 1  # optimisation passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass
    micro_batch_size: int = 0  # samples per forward/backward (whole groups; gradient accumulation); 0 = whole mini-batch
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    seed: int = 0
    output_dir: str = "runs/{recipe}"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    engine: Literal["auto", "fsdp2"] = "auto"  # auto: one process, or DDP under a launcher; fsdp2: sharded
    reference: Literal["stage_start", "initial"] = "stage_start"  # reference policy for KL terms
    drop_uniform_groups: bool = False  # dynamic sampling: drop groups whose rewards are all equal
    max_sampling_rounds: int = 1  # extra sampling rounds to refill dropped groups
    max_staleness: int = 0  # asynchronous rollouts: a worker samples up to this many steps ahead; 0 = synchronous
    partial_rollouts: bool = False  # asynchronous rollouts: completions under way continue with newer weights
    threads: int = 0  # torch CPU threads per process; 0 = the physical cores available (shared by local processes)
    rollout_threads: int = 0  # CPU threads of the rollout worker; 0 = half of this process's (the learner keeps the rest)
    save_final: bool = True
    save_every: int = 0  # write a checkpoint every N steps (always at the end and on Ctrl-C)
    keep_checkpoints: int = 2  # newest checkpoints kept
    max_bad_steps: int = 3  # consecutive non-finite updates before the run aborts (with a checkpoint)
    max_reward_failure_rate: float = 0.5  # share of completions a reward may fail on before the run stops
    trackers: list = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, trackio, mlflow


# Keys a [[stage]] may set for itself (the rest of [train] is shared by the whole run).
STAGE_TRAIN_KEYS = ("lr", "prompts_per_step", "group_size", "ppo_epochs", "mini_batches",
                    "micro_batch_size", "max_grad_norm", "weight_decay", "drop_uniform_groups",
                    "max_sampling_rounds", "reference", "max_staleness", "partial_rollouts")


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N steps (0: only at the end of each stage)
    num_prompts: int = 200
    max_new_tokens: int = 0  # 0: the sampler's max_new_tokens (or 64)
    batch_size: int = 64
    at_start: bool = False  # also evaluate before the first step


@dataclass
class ComponentSpec:
    section: str  # where it came from, e.g. "loss" or "stage[1].reward[0]"
    use: str
    options: dict[str, Any]
    weight: float = 1.0  # rewards only
    name: str = ""  # rewards only: metric name (default: use)


@dataclass
class Stage:
    name: str
    steps: int
    train: TrainConfig
    components: dict[str, Any]  # kind -> ComponentSpec (list of them for "reward"), or None
    data: dict[str, Any] | None = None  # the stage's own prompts (a curriculum); None: the recipe's [data]


@dataclass
class Recipe:
    source: str
    model: ModelConfig
    data: dict[str, Any]  # {"source": name, **options}; checked by rlctl.data
    train: TrainConfig
    eval: EvalConfig
    stages: list[Stage]
    raw: dict[str, Any]  # the merged document after includes and overrides

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source else "recipe"

