"""Plugin discovery: built-ins by kind, lookups, entry-point plugins, duplicates, broken plugins."""

from __future__ import annotations

import sys
import textwrap

import pytest

from rlctl import plugins
from rlctl.errors import PluginError


@pytest.fixture
def fresh_registry(monkeypatch):
    plugins.reset()
    yield
    plugins.reset()


def install_entry_point_plugin(tmp_path, monkeypatch, dist: str, ep_name: str, module: str, source: str):
    """A throwaway distribution on sys.path whose entry point in group ``rlctl`` names ``module``."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[rlctl]\n{ep_name} = {module}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, module, raising=False)
    plugins.reset()


def test_builtins_listed_by_kind(fresh_registry):
    assert {"hf", "demonstrations"} <= set(plugins.available("sampler"))
    assert "exact" in plugins.available("reward")
    assert "grpo" in plugins.available("advantage")
    assert {"ppo_clip", "sft"} <= set(plugins.available("loss"))
    assert {"constant", "linear", "cosine"} <= set(plugins.available("scheduler"))
    comp = plugins.registry().get("loss", "sft")
    assert (comp.package, comp.plugin) == ("rlctl", "rlctl_plugins.sft")


def test_get_returns_the_factory(fresh_registry):
    from rlctl_plugins.grpo import GroupRelativeAdvantage

    assert plugins.get("advantage", "grpo") is GroupRelativeAdvantage


def test_unknown_name_and_kind(fresh_registry):
    with pytest.raises(PluginError, match=r"loss 'ppo_clp' is not available .*Did you mean 'ppo_clip'\?"):
        plugins.get("loss", "ppo_clp")
    with pytest.raises(PluginError, match="unknown component kind 'lossy'"):
        plugins.available("lossy")


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch, fresh_registry):
    install_entry_point_plugin(tmp_path, monkeypatch, "rlctl-demo", "demo", "rlctl_demo_plugin", """
        import torch
        from rlctl import hookimpl

        class Half:
            def __init__(self, value: float = 0.5):
                self.value = value
            def score(self, rollouts):
                return torch.full((len(rollouts),), self.value)

        @hookimpl
        def rlctl_register_rewards(register):
            register("half", Half)

        @hookimpl
        def rlctl_register_samplers(register):
            register("demo_sampler", Half)

        @hookimpl
        def rlctl_register_advantages(register):
            register("demo_advantage", Half)

        @hookimpl
        def rlctl_register_losses(register):
            register("demo_loss", Half)

        @hookimpl
        def rlctl_register_schedulers(register):
            register("demo_scheduler", Half)
    """)
    comp = plugins.registry().get("reward", "half")
    assert (comp.plugin, comp.package, comp.version) == ("demo", "rlctl-demo", "1.2.3")
    assert comp.factory(value=0.25).value == 0.25
    for kind in ("sampler", "advantage", "loss", "scheduler"):
        assert plugins.registry().get(kind, f"demo_{kind}").package == "rlctl-demo"


def test_load_plugins_env_var_filters_entry_points(tmp_path, monkeypatch, fresh_registry):
    install_entry_point_plugin(tmp_path, monkeypatch, "rlctl-demo", "demo", "rlctl_demo_plugin2", """
        from rlctl import hookimpl
        @hookimpl
        def rlctl_register_rewards(register):
            register("half2", object)
    """)
    monkeypatch.setenv("RLCTL_LOAD_PLUGINS", "")
    assert "half2" not in plugins.available("reward")
    assert "exact" in plugins.available("reward")  # built-ins survive
    monkeypatch.setenv("RLCTL_LOAD_PLUGINS", "demo")
    plugins.reset()
    assert "half2" in plugins.available("reward")


def test_duplicate_name_names_both_owners(tmp_path, monkeypatch, fresh_registry):
    install_entry_point_plugin(tmp_path, monkeypatch, "rlctl-dup", "dup", "rlctl_dup_plugin", """
        from rlctl import hookimpl
        class MyGrpo:
            def compute(self, rollouts):
                raise NotImplementedError
        @hookimpl
        def rlctl_register_advantages(register):
            register("grpo", MyGrpo)
    """)
    with pytest.raises(PluginError) as info:
        plugins.get("advantage", "grpo")
    msg = str(info.value)
    assert "duplicate advantage name 'grpo'" in msg
    assert "rlctl_plugins.grpo" in msg and "GroupRelativeAdvantage" in msg
    assert "dup" in msg and "MyGrpo" in msg
    assert "sft" in plugins.available("loss")  # everything else still works


def test_broken_plugin_is_reported_and_others_load(tmp_path, monkeypatch, fresh_registry):
    install_entry_point_plugin(tmp_path, monkeypatch, "rlctl-broken", "broken", "rlctl_broken_plugin",
                               "import does_not_exist_anywhere\n")
    reg = plugins.registry()
    assert "broken" in reg.failed
    assert "Error importing plugin 'broken': ModuleNotFoundError" in reg.failed["broken"]
    assert "grpo" in plugins.available("advantage")
    with pytest.raises(PluginError, match="Plugins that failed to load: broken"):
        plugins.get("reward", "from_broken")


def test_misspelled_hook_is_rejected(tmp_path, monkeypatch, fresh_registry):
    install_entry_point_plugin(tmp_path, monkeypatch, "rlctl-typo", "typo", "rlctl_typo_plugin", """
        from rlctl import hookimpl
        @hookimpl
        def rlctl_register_reward(register):
            pass
    """)
    with pytest.raises(PluginError, match="rlctl_register_reward"):
        plugins.registry()


def test_observer_hooks_are_called(tiny_model_dir, tmp_path, monkeypatch, fresh_registry):
    """Every observer hook fires with the live state, in order, during a run."""
    from conftest import grpo_recipe, write_recipe
    from rlctl import hookimpl
    from rlctl.recipe import load_recipe
    from rlctl.trainer import Trainer

    calls = []

    class Observer:
        @hookimpl
        def rlctl_on_run_start(self, state):
            calls.append(("run_start", state.step))

        @hookimpl
        def rlctl_on_step_start(self, state):
            calls.append(("step_start", state.step))

        @hookimpl
        def rlctl_on_step_end(self, state, metrics):
            calls.append(("step_end", metrics["step"]))

        @hookimpl
        def rlctl_on_run_end(self, state, summary):
            calls.append(("run_end", summary["steps"]))

    plugins.registry().manager.register(Observer())
    recipe = load_recipe(write_recipe(tmp_path, grpo_recipe(tiny_model_dir, steps=2)))
    Trainer(recipe, output_dir=tmp_path / "run", show_progress=False).run()
    assert calls == [("run_start", 0), ("step_start", 0), ("step_end", 0), ("step_start", 1),
                     ("step_end", 1), ("run_end", 2)]


def test_every_hook_is_documented_and_tested():
    """Each hookspec has a docstring and is exercised by name somewhere in the tests."""
    import inspect
    from pathlib import Path

    from rlctl import hookspecs

    specs = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("rlctl_")]
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    docs = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    for name in specs:
        assert getattr(hookspecs, name).__doc__, name
        assert name in tests, f"{name} has no test"
        assert name in docs, f"{name} is not in docs/plugins.md"
