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


def save_final(path: Path, policy: Any, tokenizer: Any, value_head: Any, lora_save: str) -> None:
    """The trained model as a ``from_pretrained`` directory (with LoRA: the adapters, or merged)."""
    tmp = rundir.temp_dir(path.parent)  # a fresh directory: nothing of the user's is written over
    try:
        if is_lora(policy):
            save_lora(policy, tokenizer, tmp, lora_save)
        else:
            policy.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        if value_head is not None:
            from safetensors.torch import save_file
            save_file(value_head.state_dict(), str(tmp / "value_head.safetensors"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rundir.install(tmp, path)  # replaces ``path`` only if rlctl wrote it


def summary(recipe: Recipe, steps: int, seconds: float, last: dict[str, Any],
            eval_results: dict[str, dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": steps, "seconds": round(seconds, 1)}
    for key in ("reward", "accuracy", "kl", "loss", "completion_len", "tokens_per_s"):
        if key in last:
            out[f"last/{key}"] = last[key]
    stage_names = {stage.name for stage in recipe.stages}
    for label, result in eval_results.items():
        if label in stage_names or label == "start":  # intermediate evaluations stay in metrics.jsonl
            out[f"eval/{label}/accuracy"] = result["eval/accuracy"]
    return out


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
