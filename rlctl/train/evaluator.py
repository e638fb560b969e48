"""The evaluator: held-out accuracy with greedy decoding. With one process it evaluates every prompt;
with several, each evaluates its share and the results are gathered (with a sharded model every process
decodes the same number of batches, so short shares are padded with a repeated prompt, not counted).

A stage without rewards (SFT, DPO) is scored with the rewards of the first stage that defines them; the
first reward decides what counts as correct (the ``accuracy`` metric).
"""

from __future__ import annotations

from typing import Any, Callable

from rlctl.evaluate import greedy_in_batches
from rlctl.models import Policy
from rlctl.recipe import Recipe, Stage
from rlctl.train.components import build
from rlctl.train.engine import Engine
from rlctl.train.scorer import Scorer


class Evaluator:
    def __init__(self, recipe: Recipe, scorer: Scorer, engine: Engine, say: Callable[[str], None]):
        self.recipe = recipe
        self.scorer = scorer
        self.engine = engine
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
        if not rewards or not prompts:
            return {}
        engine, sampler = self.engine, built.get("sampler")
        max_new = self.recipe.eval.max_new_tokens or _max_new_tokens(self.recipe) or 64

        def run(part: list) -> tuple[dict[str, float], int]:
            # a sampler of several decoding calls (multi-turn) decodes with its environment
            rollouts = greedy_in_batches(policy, part, self.recipe.eval.batch_size or len(part),
                                         policy.tokenizer.pad_token_id, sampler, max_new_tokens=max_new,
                                         chat_template=getattr(sampler, "chat_template", False))
            if counted == 0:  # a share of padding only: decoded in lockstep, not counted
                return {}, 0
            rollouts = rollouts.select(list(range(min(len(part), counted))))
            _, stats = self.scorer.score(rollouts, rewards, specs)
            result = {"eval/accuracy": stats["accuracy"], "eval/reward": stats["reward"],
                      "eval/completion_len": float(rollouts.lengths.float().mean().item())}
            if hasattr(sampler, "batch_metrics"):
                result.update({f"eval/{k}": v for k, v in sampler.batch_metrics(rollouts).items()})
            return result, len(rollouts)

        counted = len(prompts)
        if engine.num_processes == 1:
            result, n = run(list(prompts))
        else:
            share = -(-len(prompts) // engine.num_processes)  # ceil
            mine = list(prompts[engine.process_index * share:(engine.process_index + 1) * share])
            counted = len(mine)
            if engine.sharded:  # every process decodes as many batches as the others
                mine = (mine + [prompts[0]] * share)[:share]
            local, n_local = run(mine) if mine and (counted or engine.sharded) else ({}, 0)
            n_local = min(n_local, counted)
            everyone = engine.gather_objects((local, n_local))
            n = sum(count for _, count in everyone)
            keys = sorted({key for part, count in everyone if count for key in part})
            result = {key: sum(part.get(key, 0.0) * count for part, count in everyone if count) / n for key in keys}
        if not engine.is_main:
            return {}
        self.results[label] = result
        when = f"after stage {label!r}" if label == stage.name else f"at step {step}"
        self.say(f"eval {when}: held-out accuracy {result['eval/accuracy']:.3f} "
                 f"({n} prompts, greedy), reward {result['eval/reward']:.3f}")
        return result


def _max_new_tokens(recipe: Recipe) -> int:
    for stage in reversed(recipe.stages):
        spec = stage.components["sampler"]
        if spec is not None and "max_new_tokens" in spec.options:
            return int(spec.options["max_new_tokens"])
    return 0
