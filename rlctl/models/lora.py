"""LoRA through ``peft``: ``[model.lora]`` in a recipe.

With LoRA the reference policy is the base model itself with the adapters disabled, so no second copy
of the weights is ever made.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

from rlctl.errors import RlctlError


def lora_options(r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules: list | str = "all-linear",
                 save: Literal["adapter", "merged"] = "adapter") -> dict[str, Any]:
    """The keys of ``[model.lora]`` (checked against this signature like any component)."""
    if r < 1:
        raise ValueError(f"r = {r}: must be >= 1")
    return {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": target_modules, "save": save}


def _peft() -> Any:
    try:
        import peft
    except ImportError as exc:
        raise RlctlError("[model.lora] needs the peft package: pip install 'rlctl[lora]'") from exc
    return peft


def apply_lora(model: Any, options: dict[str, Any], adapter_dir: Path | None = None) -> Any:
    """Wrap ``model`` with fresh LoRA adapters, or with the trained ones saved in ``adapter_dir``."""
    peft = _peft()
    with warnings.catch_warnings():
        # peft reads transformers' renamed `is_gradient_checkpointing`: a warning no user can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        if adapter_dir is not None:
            return peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        opts = lora_options(**options)
        config = peft.LoraConfig(r=opts["r"], lora_alpha=opts["alpha"], lora_dropout=opts["dropout"],
                                 target_modules=opts["target_modules"], task_type="CAUSAL_LM")
        return peft.get_peft_model(model, config)


def is_lora(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """The base model: what a LoRA policy uses as its reference."""
    with model.disable_adapter():
        yield


def save_lora(model: Any, tokenizer: Any, path: Path, mode: str) -> None:
    """Save adapters only (``adapter``), or the base with adapters merged in (``merged``)."""
    if mode == "merged":
        import copy

        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(path, safe_serialization=True)
    else:
        model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def merged_parameters(model: Any) -> dict[str, Any]:
    """The base model's parameters under their own names with the active adapters merged in
    (W + scale * B A per adapted layer), without copying the model: what an inference engine that
    loaded the base checkpoint needs to serve the adapted policy."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged: dict[str, Any] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            weight = module.base_layer.weight.detach()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight = weight + module.get_delta_weight(adapter).detach().to(weight.dtype)
            merged[f"{name}.weight"] = weight
            if getattr(module.base_layer, "bias", None) is not None:
                merged[f"{name}.bias"] = module.base_layer.bias.detach()
    for name, param in base.named_parameters():
        if "lora_" in name or ".base_layer." in name:
            continue
        merged.setdefault(name, param.detach())
    return merged
