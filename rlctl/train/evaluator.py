"""The evaluator: held-out accuracy with greedy decoding, on the main process only (no collectives).

A stage without rewards (SFT, DPO) is scored with the rewards of the first stage that defines them; the
first reward decides what counts as correct (the ``accuracy`` metric).
"""

from __future__ import annotations

from typing import Any, Callable

from rlctl.evaluate import generate_in_batches
from rlctl.models import Policy
from rlctl.recipe import Recipe, Stage
from rlctl.train.components import build
from rlctl.train.scorer import Scorer


class Evaluator:
    def __init__(self, recipe: Recipe, scorer: Scorer, is_main: bool, say: Callable[[str], None]):
        self.recipe = recipe
        self.scorer = scorer
        self.is_main = is_main
        self.say = say
        self.results: dict[str, dict[str, float]] = {}  # label ("start", a stage name, "stepN") -> metrics

    def evaluate(self, policy: Policy, prompts: list, stage: Stage, built: dict[str, Any], label: str,
                 step: int) -> dict[str, float]:
        rewards, specs = built["reward"], stage.components["reward"]
        if not rewards:  # e.g. an SFT stage: score with the first stage that defines rewards
            for other in self.recipe.stages:
                if other.components["reward"]:
                    rewards, specs = build(other, self.recipe.source)["reward"], other.components["reward"]
                    break
        if not rewards or not prompts or not self.is_main:
            return {}
        sampler = built.get("sampler")
        max_new = self.recipe.eval.max_new_tokens or _max_new_tokens(self.recipe) or 64
        rollouts = generate_in_batches(policy, prompts, 1, self.recipe.eval.batch_size,
                                       policy.tokenizer.pad_token_id, max_new_tokens=max_new, do_sample=False,
                                       chat_template=getattr(sampler, "chat_template", False))
        _, stats = self.scorer.score(rollouts, rewards, specs)
        result = {"eval/accuracy": stats["accuracy"], "eval/reward": stats["reward"],
                  "eval/completion_len": float(rollouts.lengths.float().mean().item())}
        self.results[label] = result
        when = f"after stage {label!r}" if label == stage.name else f"at step {step}"
        self.say(f"eval {when}: held-out accuracy {result['eval/accuracy']:.3f} "
                 f"({len(rollouts)} prompts, greedy), reward {result['eval/reward']:.3f}")
        return result


def _max_new_tokens(recipe: Recipe) -> int:
    for stage in reversed(recipe.stages):
        spec = stage.components["sampler"]
        if spec is not None and "max_new_tokens" in spec.options:
            return int(spec.options["max_new_tokens"])
    return 0
