"""Recipes: TOML -> a typed, validated ``Recipe``, with includes, ``--set`` overrides and stages.

This package gathers the recipe API under one name; each part lives in its own module:

- ``schema``: the dataclasses a recipe is read into and the names of its sections
- ``files``: reading recipe files and their includes, within limits
- ``overrides``: ``--set section.key=value`` items
- ``validate``: core sections, stages and semantic checks, into a ``Recipe``
- ``build``: resolving, checking and building each stage's components
- ``load``: ``load_recipe``, the entry point from a file, and the user-code switch
- ``dump``: the resolved recipe as plain data and as TOML

Option checking against factory signatures, shared with ``rlctl.data``, lives in ``rlctl.signature``.
"""

from __future__ import annotations

from rlctl.recipe.build import build_component, check_stage_components
from rlctl.recipe.dump import dumps_toml, resolved_dict
from rlctl.recipe.files import (
    MAX_INCLUDE_BYTES,
    MAX_INCLUDE_DEPTH,
    MAX_INCLUDE_FILES,
    MAX_NESTING,
    deep_merge,
    read_toml_with_includes,
    tomllib,
)
from rlctl.recipe.load import load_recipe, user_code_allowed
from rlctl.recipe.overrides import apply_override, parse_value
from rlctl.recipe.schema import (
    COMPONENT_SECTIONS,
    CORE_SECTIONS,
    STAGE_TRAIN_KEYS,
    TOP_LEVEL_KEYS,
    ComponentSpec,
    EvalConfig,
    ModelConfig,
    Recipe,
    Stage,
    TrainConfig,
)
from rlctl.recipe.validate import parse_recipe, to_dataclass
from rlctl.signature import check_call, coerce, unknown_key_message

__all__ = [
    "COMPONENT_SECTIONS", "CORE_SECTIONS", "MAX_INCLUDE_BYTES", "MAX_INCLUDE_DEPTH", "MAX_INCLUDE_FILES",
    "MAX_NESTING", "STAGE_TRAIN_KEYS", "TOP_LEVEL_KEYS", "ComponentSpec", "EvalConfig", "ModelConfig", "Recipe",
    "Stage", "TrainConfig", "apply_override", "build_component", "check_call", "check_stage_components",
    "coerce", "deep_merge", "dumps_toml", "load_recipe", "parse_recipe", "parse_value", "read_toml_with_includes",
    "resolved_dict", "to_dataclass", "tomllib", "unknown_key_message", "user_code_allowed",
]
