"""LoRA through peft: adapters train, the base stays frozen and serves as the reference."""

from __future__ import annotations

import pytest
import torch

from conftest import grpo_recipe, write_recipe
from rlctl.errors import RecipeError
from rlctl.metrics import read_metrics
from rlctl.recipe import load_recipe
from rlctl.trainer import Trainer

pytestmark = pytest.mark.slow


def lora_recipe(model_dir, save="adapter"):
    text = grpo_recipe(model_dir, steps=2).replace(
        f'name = "{model_dir}"', f'name = "{model_dir}"\nlora = {{ r = 4, alpha = 8, save = "{save}" }}')
    return text.replace('[loss]\nuse = "ppo_clip"', '[loss]\nuse = "ppo_clip"\nkl_coef = 0.1')


def varied(self, rollouts):
    return torch.tensor([float(len(set(t)) % 3) for t in rollouts.completions])


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft reads a renamed attribute
def test_lora_trains_adapters_only_with_the_base_as_reference(tiny_model_dir, tmp_path, monkeypatch):
    from peft import PeftModel
    from rlctl_plugins.rewards import ExactAnswerReward
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(ExactAnswerReward, "score", varied)
    trainer = Trainer(load_recipe(write_recipe(tmp_path, lora_recipe(tiny_model_dir))),
                      output_dir=tmp_path / "run", show_progress=False)
    trainer.run()
    model = trainer.policy_model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable < total / 5
    assert trainer.reference is None  # no second copy: the base with adapters disabled
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval" not in r]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # B = 0 at init: policy == base
    assert rows[1]["kl"] > 0  # the adapters moved the policy away from the base

    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    checked = 0
    for name, p in model.get_base_model().named_parameters():
        if "lora_" not in name:
            torch.testing.assert_close(p, base[name.replace(".base_layer", "")], msg=name)  # base unchanged
            checked += 1
    assert checked == len(base)
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), final)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_merged_save_is_a_plain_model(tiny_model_dir, tmp_path, monkeypatch):
    from rlctl_plugins.rewards import ExactAnswerReward
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(ExactAnswerReward, "score", varied)
    trainer = Trainer(load_recipe(write_recipe(tmp_path, lora_recipe(tiny_model_dir, save="merged"))),
                      output_dir=tmp_path / "run", show_progress=False)
    trainer.run()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trainer.policy_model(ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_options_are_checked(tiny_model_dir, tmp_path):
    text = lora_recipe(tiny_model_dir).replace("alpha = 8", "alhpa = 8")
    with pytest.raises(RecipeError, match=r"\[model.lora\] alhpa: unknown key; did you mean 'alpha'\?"):
        load_recipe(write_recipe(tmp_path, text))
    with pytest.raises(RecipeError, match=r"\[model.lora\] save = 'both': expected one of 'adapter', 'merged'"):
        load_recipe(write_recipe(tmp_path, lora_recipe(tiny_model_dir, save="both")))


def test_merged_parameters_serve_the_adapted_policy(tmp_path):
    """A plain base model loaded with ``merged_parameters`` computes what the adapted model computes:
    what an inference engine holding the base checkpoint is given after each update (``vllm`` sampler)."""
    from rlctl.models.lora import apply_lora, merged_parameters
    from rlctl.testing import tiny_policy

    policy = tiny_policy(tmp_path / "m", hidden_size=32, num_layers=2, num_heads=2)
    base_copy = tiny_policy(tmp_path / "m", hidden_size=32, num_layers=2, num_heads=2).model
    adapted = apply_lora(policy.model, {"r": 4, "alpha": 8})
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))  # B starts at zero: make the adapters do something
    merged = merged_parameters(adapted)
    assert not any("lora_" in n or "base_layer" in n for n in merged)
    assert set(merged) == {n for n, _ in base_copy.named_parameters()}
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        before = base_copy(ids).logits
        base_copy.load_state_dict(merged, strict=False)
        torch.testing.assert_close(base_copy(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-4)
    assert (before - base_copy(ids).logits).abs().max() > 1e-3  # the adapters changed the output
