"""Asynchronous vs synchronous RL on one machine: samples per second and held-out accuracy.

Four ways to spend the same CPU threads on the same RL stage, each a fresh ``rlctl run``:

    sync, 2 threads          one process, generation and training each on both threads
    sync, 2 DDP processes    two processes of one thread, each sampling and training half the batch
    async, k = 1 and k = 2   a rollout worker (1 thread) samples up to k steps ahead of the learner (1 thread)

Workloads: ``quickstart`` (the quickstart's RL stage, from the model its warm-up stage trained, which
this script trains once) and ``smollm2`` (the real-model recipe, SmolLM2-135M-Instruct, a few steps).
Reported per run: samples/s over the steps after the first (the first fills the pipeline), held-out
accuracy at the end, the learner's and the worker's idle fractions, and the mean staleness.

    python benchmarks/bench_async.py --workload quickstart
    python benchmarks/bench_async.py --workload smollm2 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CONFIGS = [  # name, extra --set overrides, processes, threads per process
    ("sync, 2 threads", [], 1, 2),
    ("sync, 2 DDP processes", [], 2, 1),
    ("async k=1 (1+1 threads)", ["train.max_staleness=1"], 1, 2),
    ("async k=2 (1+1 threads)", ["train.max_staleness=2"], 1, 2),
]


def rlctl(args: list[str], threads: int, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "w") as out:
        code = subprocess.run([sys.executable, "-m", "rlctl", "run", *args, "--quiet"], env=env, stdout=out,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"rlctl run {' '.join(args)} failed (exit {code}); see {log}")


QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml"


def quickstart_rl(work: Path) -> str:
    """The quickstart's RL stage as a recipe of its own, starting from the warm-up stage's model."""
    head, _, stages = QUICKSTART.read_text().partition("[[stage]]")
    warm = work / "warmup"
    if not (warm / "final" / "config.json").exists():
        (work / "warmup.toml").write_text(head + "[[stage]]" + stages.split("[[stage]]")[0])
        rlctl([str(work / "warmup.toml"), "--output-dir", str(warm), "--overwrite"], 2, work / "warmup.log")
    tiny = next(line for line in head.splitlines() if line.startswith("tiny = "))
    rl = head.replace(tiny, f'name = "{warm / "final"}"').replace("[train]\n", "[train]\nsteps = 200\n")
    (work / "rl.toml").write_text(rl)
    return str(work / "rl.toml")


def measure(recipe: str, sets: list[str], processes: int, threads: int, out: Path) -> dict[str, Any]:
    args = [recipe, "--output-dir", str(out), "--overwrite"]
    for s in sets:
        args += ["--set", s]
    if processes > 1:
        args += ["--processes", str(processes)]
    rlctl(args, threads, out.with_suffix(".log"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "eval" not in r][1:]
    samples = sum(r["samples"] for r in steps)
    seconds = sum(r["step_time"] for r in steps)

    def mean(key: str) -> float | None:
        values = [r[key] for r in steps if key in r]
        return sum(values) / len(values) if values else None

    summary = json.loads((out / "summary.json").read_text())
    accuracy = [v for k, v in summary.items() if k.startswith("eval/") and k.endswith("/accuracy")]
    return {"samples_per_s": samples / seconds, "accuracy": accuracy[-1] if accuracy else None,
            "learner_idle": mean("learner_idle_frac"), "worker_idle": mean("worker_idle_frac"),
            "staleness": mean("staleness"), "steps": len(steps) + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["quickstart", "smollm2"], default="quickstart")
    parser.add_argument("--steps", type=int, default=0, help="RL steps (0: the recipe's)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per configuration (seeds 0..n-1)")
    parser.add_argument("--work", default="", help="where runs go (default: a temporary directory)")
    a = parser.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="rlctl-bench-async-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.workload == "quickstart":
        recipe, sets = quickstart_rl(work), []
    else:
        recipe, sets = "smollm2_word_problems", ["eval.at_start=false"]
    if a.steps:
        sets = [*sets, f"train.steps={a.steps}"]
    results = []
    for seed in range(a.seeds):
        for name, extra, processes, threads in CONFIGS:
            out = work / f"{name.split(',')[0].split()[0]}-{len(results)}"
            r = measure(recipe, [*sets, *extra, f"train.seed={seed}"], processes, threads, out)
            r.update(config=name, seed=seed)
            results.append(r)
            print(json.dumps(r), flush=True)
    base = {r["seed"]: r["samples_per_s"] for r in results if r["config"] == "sync, 2 threads"}
    print(f"\n{a.workload}: samples/s (ratio to sync, 2 threads), held-out accuracy, idle fractions")
    print("| configuration | seed | samples/s | ratio | accuracy | learner idle | worker idle | staleness |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
        print(f"| {r['config']} | {r['seed']} | {r['samples_per_s']:.1f} | {r['samples_per_s'] / base[r['seed']]:.2f}x"
              f" | {fmt(r['accuracy'], '{:.3f}')} | {fmt(r['learner_idle'])} | {fmt(r['worker_idle'])}"
              f" | {fmt(r['staleness'])} |")


if __name__ == "__main__":
    main()
