"""The engine: where the model runs and how processes cooperate (one process, or DDP through accelerate).

Everything that differs between one process and several lives here, behind a small interface:
preparing model and optimizer, backward and gradient clipping, autocast, gathering and reducing across
processes, barriers and the trackers. The rest of the pipeline never asks how many processes there are
except through this object.

Every process draws the same global batch of prompts (same seed, same data order) and samples the
completions of its own contiguous shard. Group ids are global, so that advantages computed on the
gathered batch do not depend on how the processes split it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from rlctl.errors import RlctlError
from rlctl.rollouts import Rollouts

# metrics that add up over processes (the rest are averaged)
SUMMED = ("tokens", "samples", "tokens_per_s", "samples_per_s", "learner_tokens_per_s")
# extremes over processes, not means: the largest gap anywhere is what a parity check must see
MAXIMA = ("parity_logp_max_abs", "parity_seq_ratio_max")
MINIMA = ("parity_seq_ratio_min",)


class Engine:
    """One process or data-parallel processes, through ``accelerate``."""

    name = "ddp"  # "single process" when there is one
    sharded = False  # whether parameters are sharded over processes (every forward a collective)
    threads: int | None = None  # torch CPU threads per process, and why that many (``make_engine``)
    threads_why = ""

    def __init__(self, device: str, mixed_precision: str, trackers: Sequence[str], project_dir: str):
        import os

        from accelerate import Accelerator
        from accelerate.utils import parse_flag_from_env

        # `accelerate launch` with a DEEPSPEED or FSDP config asks accelerate to wrap the model its own way,
        # which this engine does not do: refused, never run silently as plain DDP
        if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
            raise RlctlError("DeepSpeed is not supported (ACCELERATE_USE_DEEPSPEED is set, e.g. by an accelerate "
                             "config with distributed_type: DEEPSPEED); the supported sharded engine is FSDP2: "
                             "set [train] engine = \"fsdp2\" and launch with torchrun or rlctl run --processes N")
        if parse_flag_from_env("ACCELERATE_USE_FSDP"):
            raise RlctlError("accelerate's FSDP is not supported (ACCELERATE_USE_FSDP is set, e.g. by an accelerate "
                             "config with distributed_type: FSDP); for sharded training set "
                             "[train] engine = \"fsdp2\" and launch with torchrun or rlctl run --processes N")
        self.accelerator = Accelerator(
            cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()),
            mixed_precision=mixed_precision,
            log_with=list(trackers) or None,
            project_dir=project_dir,
        )
        launched = os.environ.get("WORLD_SIZE", "")
        if launched.isdigit() and int(launched) != self.accelerator.num_processes:
            raise RlctlError(f"started as one of {launched} processes (WORLD_SIZE), but accelerate set up "
                             f"{self.accelerator.num_processes}; launch with torchrun or rlctl run --processes N")

    # ------------------------------------------------------------------------------- processes
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def gather_objects(self, value: Any) -> list[Any]:
        """``value`` of every process, in process order (the value itself with one process)."""
        if self.num_processes == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])

    def all_true(self, flag: bool) -> bool:
        return all(self.gather_objects(flag))

    def sum_counts(self, counts: dict[str, float]) -> dict[str, float]:
        """``counts`` summed over processes (float64, so that token counts stay exact)."""
        if self.num_processes == 1:
            return counts
        keys = sorted(counts)
        summed = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=self.device)
        return dict(zip(keys, self.accelerator.reduce(summed, reduction="sum").tolist()))

    # ----------------------------------------------------------------------------------- model
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.prepare_model(model)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        return self.accelerator.prepare_optimizer(optimizer)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model)

    def autocast(self) -> Any:
        return self.accelerator.autocast()

    def no_sync(self, model: torch.nn.Module) -> Any:
        """Skip the gradient all-reduce (all but the last micro-batch of an accumulation)."""
        return self.accelerator.no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        """The gradient norm before clipping (no clipping with ``max_norm <= 0``)."""
        if not params:
            return 0.0
        if max_norm > 0:
            return float(self.accelerator.clip_grad_norm_(params, max_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])))

    def frozen_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        from rlctl.models import frozen_copy

        return frozen_copy(model)

    # ------------------------------------------------------------------------------ state dicts
    def saved_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """The state to save for ``module`` when the module itself cannot be saved as it is (sharded):
        every process calls it, the main process gets the whole state. None: save the module itself."""
        return None

    def saveable(self, module: torch.nn.Module) -> Any:
        """What the main process saves for ``module``: the module, or its gathered state dict."""
        state = self.saved_state(module)
        return self.unwrap(module) if state is None else state

    def load_weights(self, module: torch.nn.Module, file: Path) -> None:
        """Load a safetensors file written from ``saveable(module)`` into ``module``."""
        from safetensors.torch import load_model  # handles tied (shared) weights

        load_model(self.unwrap(module), str(file))

    def save_optimizer(self, model: torch.nn.Module, optimizer: Any, directory: Path) -> None:
        """Called on every process; the main process writes (the state is the same everywhere)."""
        if self.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(optimizer.state_dict(), directory / "optimizer.pt")

    def load_optimizer(self, model: torch.nn.Module, optimizer: Any, directory: Path) -> None:
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))

    def close(self) -> None:
        """Undo process-wide settings at the end of a run."""

        # -------------------------------------------------------------------------------- trackers
    def init_trackers(self, name: str, config: dict[str, Any]) -> None:
        self.accelerator.init_trackers(name, config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.accelerator.log(values, step=step)

    def end_trackers(self) -> None:
        self.accelerator.end_training()

    # ---------------------------------------------------------------------------------- report
    def describe(self) -> dict[str, Any]:
        """What actually runs: ``name`` ("single" for one unsharded process, else the engine's, e.g. "ddp"),
        ``processes``, ``backend`` (the process group's, "gloo" or "nccl"; None without one) and ``device``
        ("cpu", "cuda")."""
        import torch.distributed as dist

        processes = self.num_processes
        name = self.name if processes > 1 or self.sharded else "single"
        backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else None
        return {"name": name, "processes": processes, "backend": backend, "device": self.device.type,
                "threads": self.threads, "threads_why": self.threads_why}


def shard(items: Sequence[Any], index: int, count: int) -> tuple[list[Any], int]:
    """This process's contiguous share of ``items`` and the position where it starts."""
    if len(items) % count:
        raise RlctlError(f"[train] prompts_per_step = {len(items)} must be a multiple of the number of "
                         f"processes ({count}) so that every process gets whole groups")
    size = len(items) // count
    return list(items[index * size:(index + 1) * size]), index * size


def gather_rollouts(engine: Engine, local: Rollouts, pad_token_id: int) -> tuple[Rollouts, slice]:
    """The batch of all processes (in process order) and the rows that belong to this process."""
    parts = engine.gather_objects(local.to("cpu"))
    start = sum(len(p) for p in parts[: engine.process_index])
    whole = Rollouts.concat(parts, pad_token_id=pad_token_id).to(engine.device)
    return whole, slice(start, start + len(local))


def reduce_metrics(engine: Engine, metrics: dict[str, Any]) -> dict[str, Any]:
    """Average numeric metrics over processes (sums for counts and throughput, extremes for maxima/minima)."""
    if engine.num_processes == 1:
        return metrics
    everyone = engine.gather_objects(metrics)
    out = dict(metrics)
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            if key in MAXIMA or key in MINIMA:  # a process without the key contributes nothing
                present = [float(m[key]) for m in everyone if key in m]
                out[key] = max(present) if key in MAXIMA else min(present)
                continue
            values = [m.get(key, 0.0) for m in everyone]
            total = float(sum(values))
            out[key] = total if key in SUMMED or key.endswith("/failed") else total / len(values)
    return out


def make_engine(train: Any, project_dir: str) -> Engine:
    """The engine ``[train] engine`` asks for: ``auto`` (one process, or DDP under a launcher) or ``fsdp2``."""
    if getattr(train, "engine", "auto") == "fsdp2":
        from rlctl.train.fsdp2 import FSDP2Engine

        engine: Engine = FSDP2Engine(train.device, train.mixed_precision, train.trackers, project_dir)
    else:
        engine = Engine(train.device, train.mixed_precision, train.trackers, project_dir)
    engine.threads, engine.threads_why = pick_threads(getattr(train, "threads", 0))
    torch.set_num_threads(engine.threads)
    return engine


CPU_SYSFS = "/sys/devices/system/cpu"  # where Linux describes which CPUs share a core


def physical_cores(cpus: set[int] | None = None) -> int:
    """Physical cores among the CPUs this process may run on (``os.sched_getaffinity``): hyper-threads of
    one core count once, since two threads on one core share its matrix units and only contend."""
    import os

    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = Path(CPU_SYSFS) / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology to read: every CPU a core
    return max(1, len(cores))


def pick_threads(requested: int = 0) -> tuple[int, str]:
    """Torch threads for this process and why: ``[train] threads`` when set, else the physical cores
    available to the process shared by the processes of this machine, never more than
    ``OMP_NUM_THREADS`` when the environment sets it."""
    import os

    if requested < 0:
        raise RlctlError(f"[train] threads = {requested}: must be >= 0 (0 = the physical cores available)")
    if requested:
        return requested, "[train] threads"
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    share = max(1, physical_cores() // max(1, int(local) if local.isdigit() else 1))
    limit = os.environ.get("OMP_NUM_THREADS", "")
    if limit.isdigit() and 0 < int(limit) < share:
        return int(limit), "OMP_NUM_THREADS"
    per = f" / {local} processes" if local not in ("", "1") else ""
    return share, f"physical cores available{per}; [train] threads overrides"
