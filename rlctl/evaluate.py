"""Evaluation on held-out prompts: greedy accuracy and pass@k with a recipe's rewards (``rlctl eval``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from rlctl.errors import RlctlError
from rlctl.generation import generate
from rlctl.rollouts import Prompt, Rollouts

CORRECT_AT = 1.0  # a completion is correct when the first reward scores at least this


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"k = {k} exceeds the {n} samples drawn per prompt")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def generate_in_batches(policy: Any, prompts: Sequence[Prompt], group_size: int, batch_size: int,
                        pad_token_id: int, **options: Any) -> Rollouts:
    parts = [generate(policy, prompts[i:i + batch_size], group_size, **options)
             for i in range(0, len(prompts), batch_size)]
    rollouts = Rollouts.concat(parts, pad_token_id=pad_token_id)
    # group ids restart in every part: renumber so that group i is prompt i
    rollouts.group_ids = torch.arange(len(prompts), device=rollouts.group_ids.device).repeat_interleave(group_size)
    return rollouts


def greedy_in_batches(policy: Any, prompts: Sequence[Prompt], batch_size: int, pad_token_id: int,
                      sampler: Any = None, **options: Any) -> Rollouts:
    """One greedy completion per prompt, ``batch_size`` prompts at a time: through a sampler whose
    completions take several decoding calls (``sample_greedy``: multi-turn, its environment included),
    else plain decoding with ``options``."""
    sample_greedy = getattr(sampler, "sample_greedy", None)
    if sample_greedy is None:
        return generate_in_batches(policy, prompts, 1, batch_size, pad_token_id, do_sample=False, **options)
    return Rollouts.concat([sample_greedy(policy, prompts[i:i + batch_size])
                            for i in range(0, len(prompts), batch_size)], pad_token_id=pad_token_id)


def first_reward_correct(rewards: Sequence[Any], rollouts: Rollouts) -> torch.Tensor:
    """Whether the first reward scores each completion as correct; a failed rollout (its environment
    crashed: ``info["failed"]``) never is, as in training."""
    score = rewards[0].score(rollouts).float().cpu()
    correct = (score if score.dim() == 1 else score.sum(1)) >= CORRECT_AT
    failed = torch.tensor([bool((info or {}).get("failed")) for info in rollouts.info], dtype=torch.bool)
    return correct & ~failed if len(failed) == len(correct) else correct


@dataclass
class EvalResult:
    accuracy: float  # greedy
    pass_at: dict[int, float]
    num_prompts: int
    samples_per_prompt: int

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, **{f"pass@{k}": v for k, v in self.pass_at.items()},
                "num_prompts": self.num_prompts, "samples_per_prompt": self.samples_per_prompt}


def evaluate(policy: Any, prompts: Sequence[Prompt], rewards: Sequence[Any], *, ks: Sequence[int],
             samples: int, max_new_tokens: int, temperature: float = 1.0, batch_size: int = 64,
             chat_template: bool = False, sampler: Any = None) -> EvalResult:
    """Greedy accuracy, and pass@k for each k from ``samples`` sampled completions per prompt.

    A ``sampler`` whose completions take several decoding calls (``sample_greedy``: multi-turn, tools)
    produces both, so that its environment takes part as in training; otherwise plain decoding does.
    """
    pad = policy.tokenizer.pad_token_id
    multi_turn = hasattr(sampler, "sample_greedy")
    greedy = greedy_in_batches(policy, prompts, batch_size, pad, sampler, max_new_tokens=max_new_tokens,
                               chat_template=chat_template)
    accuracy = float(first_reward_correct(rewards, greedy).float().mean())
    pass_at: dict[int, float] = {}
    if ks:
        per_batch = max(1, batch_size // samples)
        if multi_turn:  # the sampler's own temperature and limits, as in training
            sampled = Rollouts.concat([sampler.sample(policy, prompts[i:i + per_batch], samples)
                                       for i in range(0, len(prompts), per_batch)], pad_token_id=pad)
        else:
            sampled = generate_in_batches(policy, prompts, samples, per_batch, pad, max_new_tokens=max_new_tokens,
                                          do_sample=True, temperature=temperature, chat_template=chat_template)
        correct = first_reward_correct(rewards, sampled).reshape(len(prompts), samples).sum(1).tolist()
        for k in ks:
            pass_at[k] = sum(pass_at_k(samples, int(c), k) for c in correct) / len(prompts)
    return EvalResult(accuracy, pass_at, len(prompts), samples)


def resolve_target(target: str, checkpoint: str | None) -> tuple[Path, Path | None]:
    """(recipe file, model directory or None for the recipe's own model) from RECIPE|RUN_DIR."""
    path = Path(target)
    if path.is_dir():
        recipe = path / "recipe.resolved.toml"
        if not recipe.exists():
            raise RlctlError(f"{path}: not a run directory (no recipe.resolved.toml)")
        model = Path(checkpoint) if checkpoint else path / "final"
    else:
        recipe, model = path, Path(checkpoint) if checkpoint else None
    if model is not None and (model / "policy").is_dir():  # a training checkpoint
        model = model / "policy"
    if model is not None and not model.exists():
        raise RlctlError(f"--checkpoint {model}: not found")
    return recipe, model


def run_eval(target: str, checkpoint: str | None = None, ks: Sequence[int] = (1,), samples: int = 0,
             num_prompts: int = 0, output: str | None = None, seed: int = 0) -> tuple[dict[str, Any], Path]:
    """Evaluate a run's final model (or a checkpoint) with the recipe's rewards; write JSON."""
    import dataclasses

    from rlctl.data import load_prompts
    from rlctl.models import Policy, load_policy
    from rlctl.recipe import check_stage_components, load_recipe

    recipe_path, model_dir = resolve_target(target, checkpoint)
    recipe = load_recipe(recipe_path)
    adapters = model_dir is not None and (model_dir / "adapter_config.json").exists()
    if model_dir is None or adapters:  # the recipe's model (plus the saved LoRA adapters)
        model_cfg = dataclasses.replace(recipe.model, lora=None)
    else:
        model_cfg = dataclasses.replace(recipe.model, name=str(model_dir), gguf_file=None, tiny=None, lora=None)
    stage = next((s for s in reversed(recipe.stages) if s.components["reward"]), None)
    if stage is None:
        raise RlctlError(f"{recipe_path}: no [[reward]] to score completions with")
    problems: list[str] = []
    built = check_stage_components(stage, problems)
    torch.manual_seed(seed)
    model, tokenizer = load_policy(model_cfg)
    if adapters:
        from rlctl.lora import apply_lora
        model = apply_lora(model, {}, model_dir)
    model.eval()
    _, prompts = load_prompts(stage.data or recipe.data)
    if not prompts:
        raise RlctlError(f"{recipe_path}: the data source has no held-out prompts (set eval_size or eval_path)")
    prompts = prompts[: num_prompts or recipe.eval.num_prompts]
    sampler = built["sampler"]
    samples = samples or max(ks)
    max_new = recipe.eval.max_new_tokens or getattr(sampler, "max_new_tokens", 0) or 64
    result = evaluate(Policy(model, tokenizer), prompts, built["reward"], ks=[k for k in ks if k > 0],
                      samples=samples, max_new_tokens=max_new, temperature=getattr(sampler, "temperature", 1.0),
                      batch_size=recipe.eval.batch_size, chat_template=getattr(sampler, "chat_template", False),
                      sampler=sampler)
    record = {"recipe": str(recipe_path), "model": str(model_dir or recipe.model.name or "tiny"),
              **result.as_dict()}
    out = Path(output) if output else (Path(target) / "eval.json" if Path(target).is_dir() else Path("eval.json"))
    out.write_text(json.dumps(record, indent=2))
    return record, out
