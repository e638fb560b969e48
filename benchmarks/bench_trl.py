"""rlctl and TRL's ``GRPOTrainer`` side by side: completion tokens per second of a training step.

Both frameworks do the same work on the same model: ``P`` prompts x ``G`` completions of exactly ``T``
tokens (min_new_tokens = max_new_tokens), one optimiser step per batch, no KL term (beta = 0), one pass,
no gradient checkpointing. A step is timed from its start to the end of its optimiser step: generation,
rewards, advantages, the forward/backward pass and the update. Warm-up steps are discarded.

Each measurement runs in its own subprocess (so that memory is measured cleanly) and the frameworks
alternate: rlctl, trl, rlctl, trl, ... A shared or noisy machine therefore slows both alike, and the
table reports medians over repetitions and the median of the per-repetition ratios.

    python benchmarks/bench_trl.py                       # CPU table: 2 model sizes x 2 lengths
    python benchmarks/bench_trl.py --quick               # one small configuration
    python benchmarks/bench_trl.py --frameworks rlctl    # rlctl alone (e.g. before/after a change)
    python benchmarks/bench_trl.py --device cuda         # a ~0.5B Qwen2-shaped model (random weights), bf16

TRL is not a dependency of rlctl: ``pip install trl`` to run this benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT_TAG = "BENCH_RESULT "

# CPU: small random Llama models with rlctl's character-level tokenizer (vocabulary of 100)
CPU_SIZES = {
    "h64-l2": {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4},
    "h256-l4": {"arch": "llama", "hidden_size": 256, "num_layers": 4, "num_heads": 4},
}
# CUDA: the shape of Qwen2.5-0.5B (random weights, its full 151936-token vocabulary)
QWEN2_05B = {"hidden_size": 896, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2,
             "intermediate_size": 4864, "vocab_size": 151936, "max_position_embeddings": 4096}


# ------------------------------------------------------------------------------------------ models
def build_models(device: str, cache: Path, sizes: list[str]) -> dict[str, str]:
    from rlctl.models import build_tiny_model

    if device == "cpu":
        return {name: str(build_tiny_model(cache / f"bench-{name}", **CPU_SIZES[name])) for name in sizes}
    return {"qwen2-0.5b-shape": str(build_qwen2_shaped(cache / "bench-qwen2-0.5b-shape"))}


def build_qwen2_shaped(path: Path) -> Path:
    """A Qwen2 model with the shape of Qwen2.5-0.5B and random weights, saved in bf16."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlctl.models import build_tokenizer

    if (path / "config.json").exists():
        return path
    tok = build_tokenizer()  # ids beyond its 100 tokens decode to nothing; the model's vocabulary is full size
    s = QWEN2_05B
    config = AutoConfig.for_model(
        "qwen2", vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
        max_position_embeddings=s["max_position_embeddings"], bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------- measuring a step
class StepMeter:
    """Wall time and peak memory of each training step."""

    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []
        self.peak_rss: list[float] = []  # MiB, the process's resident set during the step
        self.peak_gpu: list[float] = []  # MiB, torch.cuda.max_memory_allocated during the step
        self._t0 = 0.0

    def start(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        _reset_peak_rss()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_gpu.append(torch.cuda.max_memory_allocated() / 2**20)
        self.times.append(time.perf_counter() - self._t0)
        self.peak_rss.append(_peak_rss_mib())


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak is the process's (resource.getrusage), an upper bound


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


PREAMBLE = "Add the two numbers and reply with their sum, nothing else. "


def prompts_for(n: int, prompt_len: int) -> list[dict[str, str]]:
    """``n`` addition problems; with ``prompt_len`` > 0 each starts with an instruction of that many characters
    (one token per character with the benchmark's tokenizer), as a long shared prompt prefix would."""
    from rlctl.data import arithmetic

    preamble = (PREAMBLE * (prompt_len // len(PREAMBLE) + 1))[:prompt_len]
    return [{"prompt": preamble + p.text, "answer": p.answer}
            for p in arithmetic(num_train=n, num_eval=0, max_operand=99)[0]]


# -------------------------------------------------------------------------------------- rlctl run
def run_rlctl(a: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    from rlctl import plugins
    from rlctl.hookspecs import hookimpl
    from rlctl.recipe import parse_recipe
    from rlctl.trainer import Trainer

    meter = StepMeter(a.device)

    class Timer:
        @hookimpl
        def rlctl_on_step_start(self, state):
            meter.start()

        @hookimpl
        def rlctl_on_step_end(self, state, metrics):
            meter.stop()
            tokens.append(int(metrics["tokens"]))

    tokens: list[int] = []
    plugins.registry().manager.register(Timer(), name="bench-timer")
    steps = a.warmup + a.steps
    data = out_dir / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in prompts_for(a.prompts * steps, a.prompt_len)))
    doc = {
        "model": {"name": a.model, "dtype": "bfloat16" if a.dtype == "bf16" else "float32"},
        "data": {"source": "jsonl", "path": str(data)},
        "sampler": {"use": "hf", "max_new_tokens": a.max_new, "min_new_tokens": a.max_new,
                    "temperature": 1.0, "top_p": 1.0, "top_k": 0},
        "reward": [{"use": "exact"}],
        "advantage": {"use": "grpo"},
        "loss": {"use": "ppo_clip", "clip_low": 0.2, "clip_high": 0.28},
        "train": {"steps": steps, "lr": 1e-6, "prompts_per_step": a.prompts, "group_size": a.group,
                  "seed": 0, "device": a.device, "save_final": False},
        "eval": {"num_prompts": 0},
    }
    recipe = parse_recipe(doc, source="bench_trl")
    Trainer(recipe, output_dir=out_dir, overwrite=True, show_progress=False).run()
    return _summarise(meter, tokens, a)


# ---------------------------------------------------------------------------------------- TRL run
def run_trl(a: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    meter = StepMeter(a.device)
    tokens: list[int] = []
    batch = a.prompts * a.group

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            meter.start()

        def on_step_end(self, args, state, control, **kwargs):
            meter.stop()
            tokens.append(batch * a.max_new)  # exact length: min_new_tokens = max_new_tokens

    def exact(completions, answer, **kwargs):
        import re

        out = []
        for text, ans in zip(completions, answer):
            nums = re.findall(r"-?\d+", text)
            out.append(1.0 if nums and nums[-1] == ans else 0.0)
        return out

    steps = a.warmup + a.steps
    rows = prompts_for(a.prompts * steps, a.prompt_len)
    bf16 = a.dtype == "bf16"
    args = GRPOConfig(
        output_dir=str(out_dir), report_to="none", save_strategy="no", logging_steps=10**6,
        max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=a.group, max_completion_length=a.max_new,
        generation_kwargs={"min_new_tokens": a.max_new},  # exact completion length
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1,
        epsilon=0.2, epsilon_high=0.28, learning_rate=1e-6, max_grad_norm=1.0, seed=0,
        gradient_checkpointing=False, bf16=bf16, use_cpu=a.device == "cpu",
        model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32},
        dataloader_num_workers=0, disable_dropout=True, log_completions=False,
    )
    trainer = GRPOTrainer(model=a.model, reward_funcs=[exact], args=args,
                          train_dataset=Dataset.from_list(rows), callbacks=[Timer()])
    trainer.train()
    return _summarise(meter, tokens, a)


def _summarise(meter: StepMeter, tokens: list[int], a: argparse.Namespace) -> dict[str, Any]:
    keep = slice(a.warmup, None)
    times, toks = meter.times[keep], tokens[keep]
    out = {
        "steps": len(times),
        "step_time_s": statistics.median(times),
        "tokens_per_step": statistics.median(toks),
        "tokens_per_s": statistics.median(t / s for t, s in zip(toks, times)),
        "peak_rss_mib": max(meter.peak_rss[keep]),
    }
    if meter.peak_gpu:
        out["peak_gpu_mib"] = max(meter.peak_gpu[keep])
    return out


def worker(a: argparse.Namespace) -> None:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as tmp:
        result = (run_rlctl if a.worker == "rlctl" else run_trl)(a, Path(tmp))
    print(RESULT_TAG + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------ driver
def measure(framework: str, model: str, max_new: int, a: argparse.Namespace) -> dict[str, Any] | None:
    cmd = [sys.executable, __file__, "--worker", "trl" if framework == "trl" else "rlctl", "--model", model,
           "--max-new", str(max_new), "--prompts", str(a.prompts), "--group", str(a.group),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--prompt-len", str(a.prompt_len),
           "--device", a.device, "--dtype", a.dtype, "--threads", str(a.threads)]
    env = dict(os.environ)
    if framework == "rlctl-hf":  # rlctl with transformers' generate instead of its own decoding loop
        env["RLCTL_GENERATE"] = "hf"
    if framework == "rlctl-full":  # rlctl scoring every row's prompt again (no prompt sharing in the update)
        env["RLCTL_SHARED_PROMPTS"] = "0"
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    sys.stderr.write(f"{framework} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}\n")
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--frameworks", default="rlctl,trl",
                   help="comma separated, alternated in this order: rlctl, trl, rlctl-hf (rlctl sampling with "
                        "transformers' generate), rlctl-full (rlctl without prompt sharing in the update); "
                        "ratios are of the first against each other")
    p.add_argument("--sizes", default="", help=f"CPU model sizes (default all: {', '.join(CPU_SIZES)})")
    p.add_argument("--lengths", default="", help="completion lengths (default 32,128 on CPU, 256,1024 on CUDA)")
    p.add_argument("--prompts", type=int, default=0, help="prompts per step (default 8 on CPU, 16 on CUDA)")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompt-len", type=int, default=0,
                   help="characters of instruction before each problem (= tokens on CPU); 0: problems alone")
    p.add_argument("--steps", type=int, default=3, help="measured steps per run (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="steps discarded at the start of each run")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each framework, alternated")
    p.add_argument("--threads", type=int, default=-1,
                   help="torch threads per run (default 1 on CPU: a shared machine stalls multi-threaded "
                        "kernels; 0 keeps torch's default)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="")
    p.add_argument("--quick", action="store_true", help="one small configuration, 2 repetitions")
    p.add_argument("--cache", default="", help="where the benchmark models are written")
    p.add_argument("--json", default="", help="also write all measurements to this file")
    # worker mode (one framework, one configuration; prints one result line)
    p.add_argument("--worker", choices=("rlctl", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--max-new", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cpu = a.device == "cpu"
    a.dtype = a.dtype or ("fp32" if cpu else "bf16")
    a.prompts = a.prompts or (8 if cpu else 16)
    if a.threads < 0:
        a.threads = 1 if cpu else 0
    if a.worker:
        worker(a)
        return 0

    sizes = [s for s in a.sizes.split(",") if s] or list(CPU_SIZES)
    lengths = [int(x) for x in a.lengths.split(",") if x] or ([32, 128] if cpu else [256, 1024])
    if a.quick:
        sizes, lengths, a.reps = sizes[:1], lengths[:1], 2
    frameworks = [f for f in a.frameworks.split(",") if f]
    cache = Path(a.cache) if a.cache else Path(tempfile.gettempdir()) / "rlctl-bench-models"
    models = build_models(a.device, cache, sizes)
    print(f"device {a.device}, {a.dtype}, torch threads {a.threads or 'default'}, {a.prompts} prompts "
          f"(+{a.prompt_len} characters of instruction) x {a.group} completions, {a.warmup} warm-up + {a.steps} "
          f"measured steps, {a.reps} repetitions")
    rows = []
    for size, path in models.items():
        for max_new in lengths:
            runs: dict[str, list[dict[str, Any]]] = {f: [] for f in frameworks}
            for rep in range(a.reps):
                for f in frameworks:  # alternate: rlctl, trl, rlctl, trl ...
                    r = measure(f, path, max_new, a)
                    runs[f].append(r)  # None for a failed run, so that repetitions stay aligned
                    if r is not None:
                        print(f"  {size} T={max_new} rep {rep} {f}: {r['tokens_per_s']:.0f} tok/s, "
                              f"step {r['step_time_s']:.3f}s, peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
            rows.append({"size": size, "max_new": max_new, "runs": runs})
    print()
    print(format_table(rows, frameworks))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))
    return 0


def format_table(rows: list[dict[str, Any]], frameworks: list[str]) -> str:
    head = ["model", "T"]
    for f in frameworks:
        head += [f"{f} tok/s", f"{f} peak RSS MiB"]
    gpu = any(r and "peak_gpu_mib" in r for row in rows for runs in row["runs"].values() for r in runs)
    if gpu:
        head += [f"{f} peak GPU MiB" for f in frameworks]
    first, others = frameworks[0], frameworks[1:]
    head += [f"{first}/{other} (median ratio)" for other in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["size"], str(row["max_new"])]
        aligned = row["runs"]
        runs = {f: [r for r in rs if r is not None] for f, rs in aligned.items()}
        for f in frameworks:
            rs = runs[f]
            cells.append(f"{statistics.median(r['tokens_per_s'] for r in rs):.0f}" if rs else "failed")
            cells.append(f"{statistics.median(r['peak_rss_mib'] for r in rs):.0f}" if rs else "-")
        if gpu:
            cells += [f"{statistics.median(r.get('peak_gpu_mib', 0) for r in runs[f]):.0f}" if runs[f] else "-"
                      for f in frameworks]
        for other in others:  # ratios within each repetition, then their median
            ratios = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(aligned[first], aligned[other])
                      if x is not None and y is not None]
            cells.append(f"{statistics.median(ratios):.2f}x" if ratios else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
