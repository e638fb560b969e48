"""``rlctl check-parity``: train/inference parity of a recipe's sampler, measured before a long run.

Runs the recipe for a few steps in a temporary directory (every stage, ``steps`` each, no evaluation)
and reads the parity metrics the learner logs (``rlctl.train.parity``). Step 0 compares the sampler
with the trainer on the checkpoint both loaded; every later step also checks that the weights the
sampler used were the updated ones.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from rlctl.errors import RlctlError

COLUMNS = ("parity_logp_mean_abs", "parity_logp_max_abs", "parity_seq_ratio_min", "parity_seq_ratio_max")


def measure(recipe: Path, overrides: Sequence[str], steps: int) -> list[dict[str, Any]]:
    """The parity rows of a short run: one per step whose batch had behaviour log-probs."""
    from rlctl.testing import run_recipe

    out = Path(tempfile.mkdtemp(prefix="rlctl-parity-"))
    try:
        rows = run_recipe(recipe, steps=steps, overrides=list(overrides), output_dir=out / "run")
    finally:
        shutil.rmtree(out, ignore_errors=True)  # a directory this function created, nothing else
    measured = [r for r in rows if "parity_logp_max_abs" in r]
    if not measured:
        raise RlctlError(f"{recipe}: no step had sampler log-probs to compare; the recipe's sampler does not "
                         "record them (use a sampler whose `provides` has 'behavior_logprobs', e.g. \"vllm\")")
    return measured


def verdict(rows: list[dict[str, Any]], tolerance: float) -> tuple[bool, str]:
    over = [r for r in rows if r["parity_logp_max_abs"] > tolerance]
    if not over:
        gap = max(r["parity_logp_max_abs"] for r in rows)
        return True, f"ok: the largest per-token gap is {gap:.3g} nats (tolerance {tolerance:g})"
    first = over[0]
    why = ("the sampler and the trainer disagree on the same weights (dtype, kernels, tokenizer or chat "
           "template)") if first["step"] == 0 else "after an update (weights not pushed, or pushed partly?)"
    return False, (f"the per-token gap is {first['parity_logp_max_abs']:.3g} nats > tolerance {tolerance:g} "
                   f"at step {first['step']}: {why}")
