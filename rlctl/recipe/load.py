"""Loading a recipe file: read it, apply ``--set`` overrides and validate, with user code allowed or not."""

from __future__ import annotations

import contextvars
from pathlib import Path

from rlctl.errors import RecipeError
from rlctl.recipe.files import MAX_NESTING, nesting_depth, read_toml_with_includes
from rlctl.recipe.overrides import apply_override
from rlctl.recipe.schema import Recipe
from rlctl.recipe.validate import parse_recipe

_USER_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("rlctl_user_code", default=True)


def user_code_allowed() -> bool:
    """False while a recipe is only being validated: components must not import or run user code then
    (``module:function`` references are looked up, not imported; ``trust_remote_code`` is not honoured)."""
    return _USER_CODE.get()


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                check_components: bool = True, user_code: bool = True) -> Recipe:
    """Read, merge includes, apply ``--set`` overrides and validate. Raises ``RecipeError``.

    ``user_code = False`` (``rlctl validate``) checks the recipe without importing or running user code.
    """
    path = Path(path)
    doc = read_toml_with_includes(path)
    for item in overrides:
        apply_override(doc, item, source=str(path))
    if overrides and nesting_depth(doc) > MAX_NESTING:
        raise RecipeError(f"--set: tables and arrays nested more than {MAX_NESTING} levels deep; accepted: at "
                          f"most {MAX_NESTING}", source=str(path))
    token = _USER_CODE.set(user_code)
    try:
        return parse_recipe(doc, source=str(path), check_components=check_components)
    finally:
        _USER_CODE.reset(token)
