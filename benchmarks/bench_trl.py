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
    python benchmarks/bench_trl.py --model smollm2 --mode exact,eos --warmup 1 --steps 2 --reps 1
                                                         # the real model, chat prompts, with a roofline

``--model smollm2`` is SmolLM2-135M-Instruct (``rlctl.testing.real_model()``) on chat-formatted word
problems (the ``word_problems`` data source through the model's chat template), 4 prompts x 8
completions of at most 64 tokens. ``--mode exact`` makes every completion 64 tokens on both sides;
``--mode eos`` lets completions stop at their EOS (same prompts and seeds). The table splits a step into
sampling and update and puts each against the machine: the update's FLOP/s (6 x parameters x completion
tokens / update time) against a large fp32 matrix product on the same threads, decoding's bytes/s
(parameter bytes x decoding steps / sampling time) against a large tensor copy.

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
        self.sample: list[float] = []  # seconds of each step spent sampling (generation and rewards)
        self.decode_steps: list[int] = []  # decoding steps of each step's batch (its longest completion)
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


def min_new(a: argparse.Namespace) -> int:
    """exact: every completion ``max_new`` tokens (EOS banned before); eos: completions stop at their EOS."""
    return a.max_new if a.mode == "exact" else 0


def rows_for(a: argparse.Namespace, n: int) -> list[dict[str, str]]:
    """The prompts of a run: word problems for the real model (chat-formatted by each framework from the
    model's own template), addition problems for the random ones."""
    if a.model != "smollm2":
        return prompts_for(n, a.prompt_len)
    from rlctl.data import word_problems

    return [{"prompt": p.text, "answer": p.answer} for p in word_problems(num_train=n, num_eval=0)[0]]


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
            meter.sample.append(float(metrics["sample_time"]))
            meter.decode_steps.append(int(state.rollouts.completion_ids.shape[1]))

    tokens: list[int] = []
    plugins.registry().manager.register(Timer(), name="bench-timer")
    steps = a.warmup + a.steps
    data = out_dir / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows_for(a, a.prompts * steps)))
    doc = {
        "model": {"name": a.path, "dtype": "bfloat16" if a.dtype == "bf16" else "float32"},
        "data": {"source": "jsonl", "path": str(data)},
        "sampler": {"use": "hf", "max_new_tokens": a.max_new, "min_new_tokens": min_new(a),
                    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "chat_template": a.model == "smollm2"},
        "reward": [{"use": "exact"}],
        "advantage": {"use": "grpo"},
        "loss": {"use": "ppo_clip", "clip_low": 0.2, "clip_high": 0.28},
        "train": {"steps": steps, "lr": 1e-6, "prompts_per_step": a.prompts, "group_size": a.group,
                  "seed": 0, "device": a.device, "save_final": False, "mixed_precision": a.mixed_precision,
                  "micro_batch_size": a.micro_batch_size},
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
    this_step = {"sample": 0.0, "tokens": 0, "steps": 0}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            this_step.update(sample=0.0, tokens=0, steps=0)
            meter.start()

        def on_step_end(self, args, state, control, **kwargs):
            meter.stop()
            tokens.append(this_step["tokens"])
            meter.sample.append(this_step["sample"])
            meter.decode_steps.append(this_step["steps"])

    def exact(completions, answer, **kwargs):
        import re

        out = []
        for text, ans in zip(completions, answer):
            if isinstance(text, list):  # conversational: the assistant's message
                text = text[-1]["content"]
            nums = re.findall(r"-?\d+", text)
            out.append(1.0 if nums and nums[-1] == ans else 0.0)
        return out

    steps = a.warmup + a.steps
    rows = rows_for(a, a.prompts * steps)
    if a.model == "smollm2":  # conversational rows: TRL renders them through the model's chat template
        rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    bf16 = a.dtype == "bf16"
    autocast = bf16 or a.mixed_precision == "bf16"  # TRL's bf16 flag: autocast, whatever the weights' dtype
    args = GRPOConfig(
        output_dir=str(out_dir), report_to="none", save_strategy="no", logging_steps=10**6,
        max_steps=steps, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=a.group, max_completion_length=a.max_new,
        generation_kwargs={"min_new_tokens": min_new(a)},  # exact: every completion max_new tokens
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, num_iterations=1,
        epsilon=0.2, epsilon_high=0.28, learning_rate=1e-6, max_grad_norm=1.0, seed=0,
        gradient_checkpointing=False, bf16=autocast, use_cpu=a.device == "cpu",
        model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32},
        dataloader_num_workers=0, disable_dropout=True, log_completions=False,
    )
    trainer = GRPOTrainer(model=a.path, reward_funcs=[exact], args=args,
                          train_dataset=Dataset.from_list(rows), callbacks=[Timer()])
    generate_and_score = trainer._generate_and_score_completions

    def timed(*args, **kwargs):  # sampling: generation, rewards and advantages, as rlctl's sample_time
        t0 = time.perf_counter()
        out = generate_and_score(*args, **kwargs)
        this_step["sample"] += time.perf_counter() - t0
        this_step["tokens"] += int(out["completion_mask"].sum())
        this_step["steps"] = max(this_step["steps"], int(out["completion_ids"].shape[1]))
        return out

    trainer._generate_and_score_completions = timed
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
    if meter.sample:
        out["sample_s"] = statistics.median(meter.sample[keep])
        out["update_s"] = statistics.median(t - s for t, s in zip(times, meter.sample[keep]))
        out["decode_steps"] = statistics.median(meter.decode_steps[keep])
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
# rlctl with one of its levers turned off (the variables its code reads), to measure what each is worth
VARIANTS = {
    "rlctl-hf": {"RLCTL_GENERATE": "hf"},  # transformers' generate instead of rlctl's own decoding loop
    "rlctl-full": {"RLCTL_SHARED_PROMPTS": "0"},  # every row's prompt scored again in the update
    "rlctl-logits": {"RLCTL_CHUNKED_HEAD": "0"},  # log-probs from the model's full logits
    "rlctl-padded": {"RLCTL_LENGTH_BUCKETS": "0"},  # one update forward over the whole padded batch
    "rlctl-nodrop": {"RLCTL_DECODE_COMPACT": "0"},  # finished rows stay in the decoding batch
}


def measure(framework: str, model: str, max_new: int, a: argparse.Namespace,
            mode: str = "exact") -> dict[str, Any] | None:
    cmd = [sys.executable, __file__, "--worker", "trl" if framework.startswith("trl") else "rlctl", "--path", model,
           "--model", a.model, "--mode", mode,
           "--max-new", str(max_new), "--prompts", str(a.prompts), "--group", str(a.group),
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--prompt-len", str(a.prompt_len),
           "--device", a.device, "--dtype", a.dtype, "--threads", str(a.threads)]
    if framework.endswith("-bf16"):  # fp32 weights, bf16 autocast in the update (both frameworks)
        cmd += ["--mixed-precision", "bf16"]
    if framework == "rlctl-micro":  # gradient accumulation over micro-batches of one group each
        cmd += ["--micro-batch-size", str(a.group)]
    env = dict(os.environ)
    env.update(VARIANTS.get(framework, {}))
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
                        "transformers' generate), rlctl-full (rlctl without prompt sharing in the update), "
                        "rlctl-logits (full logits), rlctl-padded (no length buckets), rlctl-nodrop (finished "
                        "rows kept in decoding), rlctl-bf16 and trl-bf16 (bf16 autocast in the update), rlctl-micro "
                        "(micro-batches of one group); "
                        "ratios are of the first against each other")
    p.add_argument("--model", choices=("random", "smollm2"), default="random",
                   help="random: small random Llama models (--sizes); smollm2: SmolLM2-135M-Instruct on chat prompts")
    p.add_argument("--mode", default="exact",
                   help="comma separated: exact (every completion --lengths tokens) and/or eos (natural stopping)")
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
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--max-new", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mixed-precision", default="no", help=argparse.SUPPRESS)
    p.add_argument("--micro-batch-size", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cpu = a.device == "cpu"
    a.dtype = a.dtype or ("fp32" if cpu else "bf16")
    a.prompts = a.prompts or (4 if a.model == "smollm2" else 8 if cpu else 16)
    if a.threads < 0:
        a.threads = 1 if cpu else 0
    if a.worker:
        worker(a)
        return 0
    if a.model == "smollm2":
        return main_real_model(a)

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


# ------------------------------------------------------------------------------ the real model
PEAKS_SCRIPT = """
import json, time, torch
torch.set_num_threads({threads})
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
a @ b
t = time.perf_counter()
for _ in range(5):
    a @ b
flops = 5 * 2 * 2048 ** 3 / (time.perf_counter() - t)
a16, b16 = a.bfloat16(), b.bfloat16()
a16 @ b16
t = time.perf_counter()
for _ in range(5):
    a16 @ b16
bf16_flops = 5 * 2 * 2048 ** 3 / (time.perf_counter() - t)
x = torch.randn(64 * 2 ** 20)
y = torch.empty_like(x)
y.copy_(x)
t = time.perf_counter()
for _ in range(5):
    y.copy_(x)
print(json.dumps({{"matmul_flops": flops, "bf16_matmul_flops": bf16_flops, "copy_bytes": 5 * 2 * x.numel() * 4 / (time.perf_counter() - t)}}))
"""


def machine_peaks(threads: int) -> dict[str, float]:
    """The fp32 and bf16 matmul FLOP/s (2048^3) and copy bandwidth (256 MiB read + written) on ``threads``
    threads."""
    code = PEAKS_SCRIPT.format(threads=threads or torch_default_threads())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def torch_default_threads() -> int:
    import torch

    return torch.get_num_threads()


def parameter_count(model_dir: str) -> int:
    """Parameters stored in the model's safetensors files (tied weights stored once)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def main_real_model(a: argparse.Namespace) -> int:
    """Both frameworks on SmolLM2-135M-Instruct in each --mode, alternating in fresh processes."""
    from rlctl.testing import real_model

    path = str(real_model())
    modes = [m for m in a.mode.split(",") if m]
    bad = [m for m in modes if m not in ("exact", "eos")]
    if bad:
        raise SystemExit(f"--mode {','.join(bad)}: expected exact, eos or both (comma separated)")
    max_new = int((a.lengths.split(",")[0]) or 64) if a.lengths else 64
    frameworks = [f for f in a.frameworks.split(",") if f]
    peaks = machine_peaks(a.threads)
    params = parameter_count(path)
    print(f"SmolLM2-135M-Instruct ({params / 1e6:.1f}M parameters), {a.dtype}, torch threads {a.threads or 'default'}, "
          f"{a.prompts} chat prompts x {a.group} completions of at most {max_new} tokens, {a.warmup} warm-up + "
          f"{a.steps} measured steps, {a.reps} repetition(s); machine: fp32 matmul "
          f"{peaks['matmul_flops'] / 1e9:.0f} GFLOP/s (bf16 {peaks['bf16_matmul_flops'] / 1e9:.0f}), copy {peaks['copy_bytes'] / 1e9:.1f} GB/s", flush=True)
    rows = []
    for mode in modes:
        runs: dict[str, list[dict[str, Any]]] = {f: [] for f in frameworks}
        for rep in range(a.reps):
            for f in frameworks:  # alternate: rlctl, trl, rlctl, trl ...
                r = measure(f, path, max_new, a, mode)
                runs[f].append(r)
                if r is not None:
                    print(f"  {mode} rep {rep} {f}: {r['tokens_per_s']:.1f} tok/s, step {r['step_time_s']:.1f}s "
                          f"(sample {r['sample_s']:.1f}s + update {r['update_s']:.1f}s), "
                          f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
        rows.append({"mode": mode, "runs": runs})
    print()
    print(format_real_table(rows, frameworks, params, peaks))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "peaks": peaks, "params": params, "rows": rows},
                                           indent=2))
    return 0


def format_real_table(rows: list[dict[str, Any]], frameworks: list[str], params: int,
                      peaks: dict[str, float]) -> str:
    """One line per mode and framework (medians over repetitions), then the ratios of the first framework."""
    head = ["mode", "framework", "tokens/step", "tok/s", "s/step", "sample s", "update s", "peak RSS MiB",
            "update GFLOP/s (of matmul peak; bf16 peak for bf16)", "decode GB/s (of copy bandwidth)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    med = statistics.median
    for row in rows:
        for f in frameworks:
            rs = [r for r in row["runs"][f] if r is not None]
            if not rs:
                lines.append("| " + " | ".join([row["mode"], f] + ["failed"] + ["-"] * (len(head) - 3)) + " |")
                continue
            update_flops = med(6 * params * r["tokens_per_step"] / r["update_s"] for r in rs)
            peak = peaks["bf16_matmul_flops" if f.endswith("bf16") else "matmul_flops"]
            decode_bytes = med(4 * params * r["decode_steps"] / r["sample_s"] for r in rs)  # fp32 weights
            lines.append("| " + " | ".join([
                row["mode"], f, f"{med(r['tokens_per_step'] for r in rs):.0f}", f"{med(r['tokens_per_s'] for r in rs):.1f}",
                f"{med(r['step_time_s'] for r in rs):.1f}", f"{med(r['sample_s'] for r in rs):.1f}",
                f"{med(r['update_s'] for r in rs):.1f}", f"{med(r['peak_rss_mib'] for r in rs):.0f}",
                f"{update_flops / 1e9:.0f} ({update_flops / peak:.0%})",
                f"{decode_bytes / 1e9:.2f} ({decode_bytes / peaks['copy_bytes']:.0%})"]) + " |")
    first = frameworks[0]
    notes = []
    for row in rows:
        for other in frameworks[1:]:
            pairs = [(x, y) for x, y in zip(row["runs"][first], row["runs"][other]) if x is not None and y is not None]
            if pairs:
                speed = med(x["tokens_per_s"] / y["tokens_per_s"] for x, y in pairs)
                rss = med(x["peak_rss_mib"] / y["peak_rss_mib"] for x, y in pairs)
                notes.append(f"{row['mode']}: {first} / {other} tokens/s {speed:.2f}x, peak RSS {rss:.2f}x")
    runs_first = {row["mode"]: [r for r in row["runs"][first] if r is not None] for row in rows}
    if runs_first.get("exact") and runs_first.get("eos"):
        eos, exact = med(r["tokens_per_s"] for r in runs_first["eos"]), med(r["tokens_per_s"] for r in runs_first["exact"])
        notes.append(f"{first} eos tokens/s / exact tokens/s: {eos / exact:.2f}x")
    return "\n".join(lines + [""] + notes)


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
