"""The documentation: generated pages are up to date, the plugin guide's examples run, the site builds."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _generator(name: str):
    spec = importlib.util.spec_from_file_location(f"rlctl_docs_{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, page", [("gen_cli", "cli.md"), ("gen_reference", "recipe-reference.md")])
def test_generated_page_is_up_to_date(name, page):
    expected = _generator(name).render()
    current = (DOCS / page).read_text(encoding="utf-8") if (DOCS / page).exists() else ""
    assert current == expected, f"docs/{page} is out of date: run python docs/{name}.py"


def test_reference_lists_every_builtin_component_and_core_key():
    from rlctl import plugins
    from rlctl.recipe import EvalConfig, ModelConfig, TrainConfig

    text = (DOCS / "recipe-reference.md").read_text(encoding="utf-8")
    for comp in plugins.components():
        if comp.package == "rlctl":
            assert f'#### `use = "{comp.name}"`' in text, comp.name
    for cls in (ModelConfig, TrainConfig, EvalConfig):
        for name in cls.__dataclass_fields__:
            assert f"| `{name}` |" in text, name


def test_plugin_guide_examples_run():
    """Every Python example in docs/plugins.md runs, registers what it says, and its tests pass."""
    text = (DOCS / "plugins.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace: dict = {}
    for block in blocks:
        if "my_plugin" in block:  # the end-to-end example imports a package that does not exist here
            continue
        exec(compile(block, "docs/plugins.md", "exec"), namespace)
    registered = {}
    for hook in ("samplers", "rewards", "advantages", "losses", "schedulers"):
        namespace[f"rlctl_register_{hook}"](lambda name, factory: registered.setdefault(name, factory))
    assert set(registered) == {"instruction_prefix", "contains_answer", "sign", "reinforce", "step_decay"}
    for name, value in namespace.items():
        if name.startswith("test_") and callable(value):
            value()

    from rlctl import testing
    from rlctl.state import TrainState

    batch = testing.fake_rollouts(completions=["x 7", "8"], answers="7")
    assert registered["contains_answer"]().score(batch).tolist() == [1.0, 0.0]
    state = TrainState(stage_step=25, base_lr=1.0)
    registered["step_decay"]().step(state)
    assert state.lr == 0.25
    assert isinstance(registered["reinforce"](entropy_coef=0.1).requires, tuple)
    assert torch.is_tensor(registered["sign"]().compute(testing.fake_rollouts(rewards=[1, 0], group_size=2)))


def test_nav_lists_every_page():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    missing = sorted(p for p in pages if not re.search(rf"(^|\s|:\s){re.escape(p)}\s*$", config, flags=re.M))
    assert not missing, f"pages missing from the nav in mkdocs.yml: {missing}"


def test_site_builds_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").exists()
    shutil.rmtree(tmp_path / "site", ignore_errors=True)
