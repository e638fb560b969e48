"""The policy a run starts from: the recipe's model, or on resume the checkpoint's weights (with LoRA:
the recipe's base model and the checkpoint's adapters), checked against what the stages ask of its
tokenizer (a chat template)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rlctl.lora import apply_lora
from rlctl.models import check_chat_template, load_policy
from rlctl.recipe import Recipe


def load_run_policy(recipe: Recipe, checkpoint: Path | None) -> tuple[Any, Any]:
    """(model in training mode, tokenizer); ``checkpoint``: the one a run resumes from, if any."""
    model_cfg, lora = recipe.model, recipe.model.lora
    if checkpoint is not None and lora is None:  # the checkpoint's weights replace the starting point
        model_cfg = dataclasses.replace(model_cfg, name=str(checkpoint / "policy"), tiny=None)
    model, tokenizer = load_policy(model_cfg)
    for stage in recipe.stages:
        spec = stage.components["sampler"]
        if spec is not None and spec.options.get("chat_template"):
            check_chat_template(tokenizer, model_cfg.name or model_cfg.gguf_file or "tiny", f"[{spec.section}]")
    if lora is not None:  # a checkpoint of a LoRA run holds the adapters only
        model = apply_lora(model, lora, checkpoint / "policy" if checkpoint is not None else None)
    model.train()
    return model, tokenizer
