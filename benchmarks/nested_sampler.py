"""Rollout throughput of the ``nested`` sampler (blocks skipped) against the full-model ``hf`` sampler.

Both samplers generate the same batch (prompts x group size) with fixed-length completions
(min_new_tokens = max_new_tokens), so they produce the same number of tokens. For every repetition and
every skip ratio the two are timed back to back, in alternating order, in one process; the table reports
medians over repetitions:

    tokens/s = N * max_new_tokens / seconds of sampler.sample(...)

``nested`` time includes recording the behaviour log-probs (one teacher-forced forward of the skipped
model); the "generate only" column leaves that forward out. The target column is 0.8 * L / L_kept, the
ideal speed-up of running L_kept of L blocks discounted by 20% for the parts that do not shrink
(embeddings, LM head, sampling, Python overhead).

    python benchmarks/nested_sampler.py --device cpu --config tiny
    python benchmarks/nested_sampler.py --device cuda --config 0.5b     # Qwen2-style ~0.5B, random weights
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import torch

CONFIGS: dict[str, dict[str, Any]] = {
    # big enough on a CPU that the blocks dominate the cost of a decoding step
    "tiny": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=1024, vocab_size=None),
    # the shape of Qwen2.5-0.5B (494M parameters), random weights
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),
}


def build_policy(config: str, device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from rlctl.models import Policy, build_tokenizer

    hf_logging.set_verbosity_error()
    tok = build_tokenizer()
    spec = dict(CONFIGS[config])
    spec["vocab_size"] = spec["vocab_size"] or len(tok)  # ids beyond the tokenizer decode to nothing
    cfg = AutoConfig.for_model("qwen2", max_position_embeddings=4096, tie_word_embeddings=True,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).to(device).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return Policy(model, tok)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(sampler: Any, policy: Any, prompts: list, group_size: int, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    sampler.sample(policy, prompts, group_size)
    _sync(device)
    return time.perf_counter() - start


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)"
    if device == "cuda":
        text = f"{torch.cuda.get_device_name()} ({text})"
    return text


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    from rlctl.data import load_prompts
    from rlctl_plugins.nested import NestedSampler, find_blocks, num_skipped
    from rlctl_plugins.samplers import HFGenerateSampler

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--config", choices=tuple(CONFIGS), default="tiny")
    parser.add_argument("--ratios", default="0,0.25,0.5,0.75", help="comma-separated skip ratios")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--keep-first", type=int, default=1)
    parser.add_argument("--keep-last", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto: float32 on cpu, bfloat16 on cuda")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if args.device == "cuda" else torch.float32)
    policy = build_policy(args.config, args.device, dtype)
    prompts, _ = load_prompts({"source": "arithmetic", "num_train": args.prompts, "num_eval": 0, "seed": 0})
    prompts = prompts[: args.prompts]
    ratios = [float(r) for r in args.ratios.split(",")]
    num_blocks = len(find_blocks(policy.model)[1])
    n_tokens = len(prompts) * args.group_size * args.max_new_tokens
    gen = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, temperature=1.0)
    full = HFGenerateSampler(**gen)
    nested = {r: NestedSampler(skip_ratio=r, keep_first=args.keep_first, keep_last=args.keep_last, seed=0, **gen)
              for r in ratios}

    for sampler in (full, *nested.values()):  # warm-up: allocator, kernels, lazy imports
        timed(sampler, policy, prompts, args.group_size, args.device)
    times: dict[str, dict[float, list[float]]] = {"hf": {r: [] for r in ratios}, "nested": {r: [] for r in ratios},
                                                   "generate": {r: [] for r in ratios}}
    for rep in range(args.reps):
        for r in ratios:
            order = ("hf", "nested") if rep % 2 == 0 else ("nested", "hf")
            for name in order:
                sampler = full if name == "hf" else nested[r]
                torch.manual_seed(rep)
                times[name][r].append(timed(sampler, policy, prompts, args.group_size, args.device))
                if name == "nested":
                    times["generate"][r].append(sampler.last_timing["generate_s"])

    print(f"# nested sampler vs hf sampler: config {args.config} ({num_blocks} blocks), device {args.device}, "
          f"{dtype}".replace("torch.", ""))
    print(f"# machine: {machine(args.device)}")
    print(f"# batch: {len(prompts)} prompts x {args.group_size} = {len(prompts) * args.group_size} completions x "
          f"{args.max_new_tokens} tokens (fixed length), median of {args.reps} alternating repetitions")
    print()
    print("| skip ratio | blocks kept | hf tok/s | nested tok/s | speed-up | speed-up (generate only) | "
          "target 0.8·L/L_kept |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for r in ratios:
        kept = num_blocks - num_skipped(r, num_blocks, args.keep_first, args.keep_last)
        hf_s, nested_s, gen_s = (statistics.median(times[k][r]) for k in ("hf", "nested", "generate"))
        row = {"skip_ratio": r, "kept": kept, "hf_tok_s": n_tokens / hf_s, "nested_tok_s": n_tokens / nested_s,
               "speedup": hf_s / nested_s, "speedup_generate": hf_s / gen_s, "target": 0.8 * num_blocks / kept}
        rows.append(row)
        print(f"| {r:g} | {kept}/{num_blocks} | {row['hf_tok_s']:.0f} | {row['nested_tok_s']:.0f} | "
              f"{row['speedup']:.2f}x | {row['speedup_generate']:.2f}x | {row['target']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
