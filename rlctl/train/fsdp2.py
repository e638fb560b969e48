"""The FSDP2 engine (``[train] engine = "fsdp2"``): parameters, gradients and optimizer states sharded
over the processes with ``torch.distributed.fsdp.fully_shard``.

Each transformer block (the model's ``_no_split_modules``) and then the whole model become FSDP units:
a forward or backward gathers one block's parameters at a time, and gradients are reduce-scattered
(averaged over processes, as with DDP). Because every forward is a collective, the processes must run
the same forwards: decoding runs in lockstep until every process is done (``set_lockstep``), shared-prompt
scoring is off, reference log-probs are not cached, and evaluation runs on every process. A checkpoint
holds the full policy (gathered, written by the main process, so it loads with ``from_pretrained``) and
the optimizer state sharded with ``torch.distributed.checkpoint``; the final model is a full HF model.
The frozen reference is a second sharded model whose shards are copied from the policy's (no deepcopy
of sharded tensors). With ``mixed_precision = "bf16"``: bf16 parameters in compute, fp32 gradient
reduction and fp32 master weights.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from rlctl.errors import RlctlError
from rlctl.models.generation import set_lockstep
from rlctl.train.engine import Engine


class FSDP2Engine(Engine):
    name = "fsdp2"
    sharded = True

    def __init__(self, device: str, mixed_precision: str, trackers: Any, project_dir: str):
        if mixed_precision == "fp16":
            raise RlctlError('[train] mixed_precision = "fp16": the fsdp2 engine accepts "no" or "bf16"')
        _ensure_process_group()
        super().__init__(device, "no", trackers, project_dir)  # precision is FSDP's policy, not autocast
        from torch.distributed.device_mesh import init_device_mesh

        self.bf16 = mixed_precision == "bf16"
        self.mesh = init_device_mesh(self.device.type, (self.num_processes,))
        set_lockstep(self.all_done)

    def all_done(self, done: bool) -> bool:
        flag = torch.tensor([1 if done else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def close(self) -> None:
        """Decoding stops waiting for other processes; the process group ends with the run (a gloo
        group left to the interpreter's exit can abort it)."""
        set_lockstep(None)
        if dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()

    # ----------------------------------------------------------------------------------- model
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 \
            else MixedPrecisionPolicy()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft (LoRA)
        names = set(getattr(base, "_no_split_modules", None) or ())
        for module in model.modules():
            if type(module).__name__ in names:
                fully_shard(module, mesh=self.mesh, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, mp_policy=policy)
        return model

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        return optimizer

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # fully_shard changes the module in place

    def autocast(self) -> Any:
        return _nothing()

    @contextmanager
    def no_sync(self, model: torch.nn.Module) -> Iterator[None]:
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float) -> float:
        if not params:
            return 0.0
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def frozen_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen sharded copy: the same architecture built without memory, sharded alike, and the
        policy's local shards (and buffers) copied into it."""
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            copy = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
        copy = self.prepare_model(copy)
        copy.to_empty(device=self.device)
        with torch.no_grad():
            for mine, theirs in zip(copy.parameters(), model.parameters()):
                mine.copy_(theirs)
            for mine, theirs in zip(copy.buffers(), model.buffers()):
                mine.copy_(theirs)
        copy.eval()
        for p in copy.parameters():
            p.requires_grad_(False)
        return copy

    # ------------------------------------------------------------------------------ state dicts
    def saved_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The whole module's state on the main process (empty elsewhere); every process must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # tied weights (embeddings and LM head) are one parameter under two names: keep the first name,
        # as save_pretrained does for an unsharded model
        first: dict[int, str] = {}
        names = []
        for name, param in module.named_parameters(remove_duplicate=False):
            first.setdefault(id(param), name)
            names.append(name)
        duplicates = set(names) - set(first.values())
        return {k: v for k, v in state.items() if k not in duplicates}

    def load_weights(self, module: torch.nn.Module, file: Path) -> None:
        """Every process reads the whole file and keeps its shards."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, load_file(str(file)), options=StateDictOptions(full_state_dict=True))

    def save_optimizer(self, model: torch.nn.Module, optimizer: Any, directory: Path) -> None:
        """Every process writes its shard of the optimizer state (``torch.distributed.checkpoint``)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(directory / "optimizer"))

    def load_optimizer(self, model: torch.nn.Module, optimizer: Any, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(state, checkpoint_id=str(directory / "optimizer"))
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _ensure_process_group() -> None:
    """FSDP2 needs a process group, also for one process started without a launcher."""
    if dist.is_available() and dist.is_initialized():
        return
    if "WORLD_SIZE" in os.environ:
        return  # a launcher set the environment; accelerate creates the group
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"})
