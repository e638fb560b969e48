"""Every bad recipe gets a one-line error naming the key, never a traceback; the loader never crashes."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlctl.cli import cli
from rlctl.errors import RecipeError
from rlctl.recipe import COMPONENT_SECTIONS, TrainConfig, parse_recipe

CORPUS = sorted((Path(__file__).parent / "bad_recipes").glob("*.toml"))


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_recipe_gives_one_line_error(path, monkeypatch):
    monkeypatch.chdir(path.parent)
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), result.output
    assert any(expected in line for line in lines), result.output
    assert len(lines) == 1, result.output  # one problem, one line (no cascades)


def test_corpus_is_not_empty():
    assert len(CORPUS) >= 20


# ------------------------------------------------------------------ property-based: never a crash
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                    st.text(max_size=8), st.lists(st.integers(0, 3), max_size=3))
keys = st.sampled_from([*(f.name for f in TrainConfig.__dataclass_fields__.values()), "use", "name", "weight",
                        "clip_low", "std_scope", "max_new_tokens", "steps", "tiny", "source", "bogus"])
tables = st.dictionaries(keys, scalars, max_size=5)
documents = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(tables, st.just({"name": "m"}), scalars),
        "train": st.one_of(tables, scalars),
        "data": st.one_of(tables, scalars),
        "eval": tables,
        "reward": st.one_of(st.lists(tables, max_size=2), tables, scalars),
        "stage": st.one_of(st.lists(tables, max_size=2), scalars),
        **{k: st.one_of(tables, st.just({"use": "grpo"}), scalars) for k in COMPONENT_SECTIONS if k != "reward"},
        "junk": scalars,
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_loader_only_ever_raises_recipe_errors(doc):
    """Whatever the document, the loader returns a Recipe or raises RecipeError listing problems."""
    try:
        parse_recipe(doc, source="fuzz.toml")
    except RecipeError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
