"""What a run leaves in its directory besides checkpoints and metrics: the resolved recipe and package
versions at the start, the final model and the summary at the end (the main process writes; run
directories are claimed and cleared by ``rlctl.train.rundir``)."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any

from rlctl.lora import is_lora, save_lora
from rlctl.recipe import Recipe, dumps_toml, resolved_dict
from rlctl.train import rundir


def write_run_info(run_dir: Path, recipe: Recipe) -> None:
    (run_dir / "recipe.resolved.toml").write_text(dumps_toml(resolved_dict(recipe)))
    (run_dir / "versions.json").write_text(json.dumps(versions(), indent=2))


def save_final(path: Path, policy: Any, tokenizer: Any, value_head: Any, lora_save: str,
               model_state: dict | None = None) -> None:
    """The trained model as a ``from_pretrained`` directory (with LoRA: the adapters, or merged).
    ``model_state`` (and a dict ``value_head``): full state dicts of sharded modules."""
    tmp = rundir.temp_dir(path.parent)  # a fresh directory: nothing of the user's is written over
    try:
        if is_lora(policy):
            save_lora(policy, tokenizer, tmp, lora_save)
        else:
            policy.save_pretrained(tmp, safe_serialization=True, state_dict=model_state)
            tokenizer.save_pretrained(tmp)
        if value_head is not None:
            from safetensors.torch import save_file
            state = value_head if isinstance(value_head, dict) else value_head.state_dict()
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "value_head.safetensors"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rundir.install(tmp, path)  # replaces ``path`` only if rlctl wrote it


def save_final_model(engine: Any, path: Path, learner: Any, tokenizer: Any, lora_save: str) -> None:
    """``save_final`` from a run: sharded modules are gathered by every process, the main one writes."""
    state = engine.saved_state(learner.policy)
    head = engine.saveable(learner.value_head) if learner.value_head is not None else None
    engine.barrier()
    if engine.is_main:
        save_final(path, learner.policy, tokenizer, head, lora_save, model_state=state)


def summary(recipe: Recipe, steps: int, seconds: float, last: dict[str, Any],
            eval_results: dict[str, dict[str, float]], engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's ``summary.json``: steps, time, the engine used (``Engine.describe``), last metrics and
    held-out accuracies."""
    out: dict[str, Any] = {"steps": steps, "seconds": round(seconds, 1)}
    if engine is not None:
        out.update({"engine": engine["name"], "processes": engine["processes"]})
    for key in ("reward", "accuracy", "kl", "loss", "completion_len", "tokens_per_s"):
        if key in last:
            out[f"last/{key}"] = last[key]
    stage_names = {stage.name for stage in recipe.stages}
    for label, result in eval_results.items():
        if label in stage_names or label == "start":  # intermediate evaluations stay in metrics.jsonl
            out[f"eval/{label}/accuracy"] = result["eval/accuracy"]
    return out


def engine_line(engine: dict[str, Any]) -> str:
    """"engine: ddp, 2 processes (gloo, cpu)" or "engine: single process (cpu)" (``Engine.describe``), then
    the torch threads of each process and why, when the engine chose them ("; 2 torch threads per process
    (physical cores available; [train] threads overrides)")."""
    if engine["name"] == "single":
        line = f"engine: single process ({engine['device']})"
    else:
        where = ", ".join(v for v in (engine["backend"], engine["device"]) if v)
        count = engine["processes"]
        line = f"engine: {engine['name']}, {count} process{'' if count == 1 else 'es'} ({where})"
    threads = engine.get("threads")
    if threads and engine.get("device") == "cpu":
        line += f"; {threads} torch thread{'' if threads == 1 else 's'} per process ({engine.get('threads_why', '')})"
    return line


def print_summary(console: Any, run_dir: Path, summary: dict[str, Any], recipe: Recipe,
                  eval_results: dict[str, dict[str, float]]) -> None:
    from rlctl.metrics import summary_table

    console.print(summary_table(f"run summary: {run_dir}", summary))
    trail = accuracy_trail(recipe, eval_results)
    if trail:
        console.print(f"held-out accuracy: {trail}", highlight=False)


def accuracy_trail(recipe: Recipe, eval_results: dict[str, dict[str, float]]) -> str:
    """"0.080 at the start -> 0.560 after main": held-out accuracy at the start and after each stage."""
    trail = [(f"after {s.name}", eval_results[s.name]["eval/accuracy"]) for s in recipe.stages
             if s.name in eval_results]
    if "start" in eval_results:
        trail.insert(0, ("at the start", eval_results["start"]["eval/accuracy"]))
    return " -> ".join(f"{acc:.3f} {when}" for when, acc in trail)


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested recipe tables as one level of ``a.b.c`` keys with scalar values (tracker configs)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list):
        if all(not isinstance(v, (dict, list)) for v in tree):
            return {prefix[:-1]: str(tree)}
        out = {}
        for i, value in enumerate(tree):
            out.update(flat(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("rlctl", "torch", "transformers", "accelerate", "pluggy", "tokenizers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
