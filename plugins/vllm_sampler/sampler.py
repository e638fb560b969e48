"""The ``vllm`` sampler: rollouts from a vLLM engine, colocated or in a rollout server.

``server = ""`` (default): the engine lives with the trainer (its engine core in a child process, as
vLLM does by default); ``server = "auto"``: rlctl starts a rollout server (``server.py``) on the loopback
address and stops it with the run; ``server = "http://host:port"``: a server someone else started.

Before each batch whose policy weights changed since the last one (any optimizer step), the parameters
are written to a tmpfs file and loaded by the engine (``worker.py``); a colocated or auto-started engine
loaded the checkpoint itself, so the first batch needs no transfer, while a server given by URL always
gets the weights before its first batch. Each sampled token's log-prob after temperature becomes
``behavior_logprobs``: the run logs train/inference parity from it (``rlctl.train.parity``), and
``tis_cap`` on the loss corrects for it.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlctl.errors import RlctlError
from rlctl.generation import encode_prompts, eos_token_ids
from rlctl.models import Policy
from rlctl.rollouts import Prompt, Rollouts
from rlctl_plugins.samplers import HFGenerateSampler
from rlctl_plugins.vllm_sampler.outputs import rollouts_from_completions
from rlctl_plugins.vllm_sampler.weights import weights_file, weights_version


class VLLMSampler(HFGenerateSampler):
    """Sample with vLLM (colocated, or a rollout server); weights are pushed after every update."""

    provides = ("behavior_logprobs",)
    # not inside rlctl's rollout worker (max_staleness > 0): vLLM starts processes of its own, which a
    # daemon worker process may not; its rollout server is the way to overlap sampling and training
    runs_in_worker = False

    def __init__(self, max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, min_new_tokens: int = 0, chat_template: bool = False,
                 gpu_memory_utilization: float = 0.3, max_model_len: int = 0, seed: int = 0,
                 enforce_eager: bool = False, kv_cache_gib: float = 0, server: str = "",
                 request_timeout: float = 600.0, retries: int = 3):
        super().__init__(max_new_tokens, temperature, top_p, top_k, min_new_tokens, chat_template)
        if not 0 < gpu_memory_utilization < 1:
            raise ValueError(f"gpu_memory_utilization = {gpu_memory_utilization}: must be in (0, 1)")
        if max_model_len < 0:
            raise ValueError(f"max_model_len = {max_model_len}: must be >= 0 (0 = the model's own)")
        if kv_cache_gib < 0:
            raise ValueError(f"kv_cache_gib = {kv_cache_gib}: must be >= 0 (0 = vLLM's default)")
        if server and server != "auto" and not server.startswith(("http://", "https://")):
            raise ValueError(f'server = {server!r}: must be "" (colocated), "auto" or an http:// URL')
        if request_timeout <= 0 or retries < 0:
            raise ValueError("request_timeout must be > 0 and retries >= 0")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.seed = seed
        self.enforce_eager = enforce_eager
        self.kv_cache_gib = kv_cache_gib
        self.server = server
        self.request_timeout, self.retries = request_timeout, retries
        self.engine: Any = None
        self._synced_version: int | None = None  # weights version last pushed into the engine
        self.syncs = 0
        self.batches = 0  # sampled so far: with ``seed``, names each batch's random stream (see sample)

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}  # a resumed run draws the same streams it would have drawn

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = int(state["batches"])

    # ------------------------------------------------------------------------------- the engine
    def _start_engine(self, policy: Policy) -> Any:
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise RlctlError('the "vllm" sampler runs in one process; launch without --processes/torchrun')
        # [model.lora]: the engine serves the base checkpoint; every push carries the adapters merged in
        source = getattr(policy.model, "name_or_path", "") or policy.model.config._name_or_path
        dtype = str(next(policy.model.parameters()).dtype).removeprefix("torch.")
        options = dict(seed=self.seed, max_model_len=self.max_model_len, kv_cache_gib=self.kv_cache_gib,
                       gpu_memory_utilization=self.gpu_memory_utilization, enforce_eager=self.enforce_eager)
        if self.server == "auto":
            from rlctl_plugins.vllm_sampler.client import ServerEngine

            return ServerEngine.launch(source, dtype, timeout=self.request_timeout, retries=self.retries,
                                       **options)
        if self.server:
            from rlctl_plugins.vllm_sampler.client import ServerEngine

            engine = ServerEngine(self.server, timeout=self.request_timeout, retries=self.retries)
            engine.health()  # a server that is down fails here, before any work is done
            return engine
        from rlctl_plugins.vllm_sampler.engine import LocalEngine

        return LocalEngine(source, dtype, **options)

    def sync_weights(self, policy: Policy) -> None:
        """Push the policy's parameters into the engine if an update changed them since the last push."""
        version = weights_version(policy.model)
        if version == self._synced_version:
            return
        # an engine that loaded the checkpoint itself needs no push before the first batch; a LoRA policy's
        # engine loaded only the base (a resumed run's adapters are not zero), a URL server whatever it had
        from rlctl.models.lora import is_lora

        loaded_itself = (self._synced_version is None and not (self.server and self.server != "auto")
                         and not is_lora(policy.model))
        if not loaded_itself:
            with weights_file(policy.model) as path:
                self.engine.load_weights(path, version)
            self.syncs += 1
        self._synced_version = version

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    # ------------------------------------------------------------------------------- sampling
    def sample(self, policy: Policy, prompts: Sequence[Prompt], group_size: int) -> Rollouts:
        if self.engine is None:
            self.engine = self._start_engine(policy)
        self.sync_weights(policy)
        tok = policy.tokenizer
        enc = encode_prompts(tok, [p.text for p in prompts], self.chat_template)
        prompt_ids = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
        # one seeded stream per prompt and batch: the same completions whatever the engine's batching,
        # restarts or process layout (vLLM draws a request's n samples from its own generator)
        seeds = [seed_of(self.seed, self.batches, i) for i in range(len(prompts))]
        groups = self.engine.generate(prompt_ids, n=group_size, temperature=self.temperature, top_p=self.top_p,
                                      top_k=self.top_k, max_tokens=self.max_new_tokens,
                                      min_tokens=self.min_new_tokens, seeds=seeds)
        self.batches += 1
        return rollouts_from_completions(groups, prompts, group_size, enc, tok, eos_token_ids(policy.model, tok),
                                         self.temperature, policy.device)


def seed_of(seed: int, batch: int, prompt: int) -> int:
    """A request's seed: distinct for every (run seed, batch, prompt), within vLLM's 63-bit range."""
    return ((seed * 1_000_003 + batch) * 1_000_033 + prompt) & (2**63 - 1)
