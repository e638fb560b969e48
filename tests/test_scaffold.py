"""The plugin author's experience: `rlctl new recipe|plugin`, `rlctl plugins --verbose`, `rlctl.testing`
and one-line component errors from `rlctl run`."""

from __future__ import annotations

import importlib
import json
import os
import site
import subprocess
import sys
import textwrap
import types
from importlib import metadata
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import grpo_recipe, write_recipe
from rlctl import hookimpl, plugins, scaffold, testing
from rlctl.cli import cli
from rlctl.errors import RlctlError
from rlctl.recipe import load_recipe, tomllib

TEMPLATES = scaffold.recipe_templates()


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def fresh_registry():
    plugins.reset()
    yield
    plugins.reset()


def _import_scaffolded(root: Path, module: str, monkeypatch) -> types.ModuleType:
    """Import a scaffolded (not installed) package's plugin module from its src/ folder."""
    monkeypatch.syspath_prepend(str(root / "src"))
    for name in (module, f"{module}.plugin"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module(f"{module}.plugin")


# ------------------------------------------------------------------------------------ new recipe
def test_new_recipe_list_shows_every_shipped_recipe(runner):
    result = runner.invoke(cli, ["new", "recipe", "--list"])
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.stdout.splitlines()}
    shipped = {p.stem for p in (Path(__file__).parents[1] / "recipes").glob("*.toml")}
    assert listed == shipped and "quickstart" in listed
    assert all(len(line.split(maxsplit=1)) == 2 for line in result.stdout.splitlines())  # with a summary


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_every_template_scaffolds_and_validates(runner, tmp_path, template):
    result = runner.invoke(cli, ["new", "recipe", "mine", "--from", template, "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    path = tmp_path / "mine.toml"
    text = path.read_text()
    assert text.startswith(f"# mine.toml: made with `rlctl new recipe mine --from {template}`")
    assert "# Options of the components this recipe uses" in text
    validated = runner.invoke(cli, ["validate", str(path)])
    assert validated.exit_code == 0, validated.output
    # the body is the shipped recipe itself: both resolve to the same recipe
    assert validated.stdout == runner.invoke(cli, ["validate", str(TEMPLATES[template])]).stdout


def test_new_recipe_refuses_to_overwrite_without_force(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert runner.invoke(cli, ["new", "recipe", "run1", "--from", "quickstart"]).exit_code == 0
    assert (tmp_path / "run1.toml").exists()
    (tmp_path / "run1.toml").write_text("# mine\n")
    again = runner.invoke(cli, ["new", "recipe", "run1", "--from", "quickstart"])
    assert again.exit_code == 2
    assert "run1.toml already exists; pass --force to overwrite it" in again.output
    assert (tmp_path / "run1.toml").read_text() == "# mine\n"
    forced = runner.invoke(cli, ["new", "recipe", "run1", "--from", "quickstart", "--force"])
    assert forced.exit_code == 0 and "[[stage]]" in (tmp_path / "run1.toml").read_text()
    to_file = runner.invoke(cli, ["new", "recipe", "x", "--from", "quickstart", "-o", str(tmp_path / "y.toml")])
    assert to_file.exit_code == 0 and (tmp_path / "y.toml").exists()


def test_new_recipe_errors(runner, tmp_path):
    result = runner.invoke(cli, ["new", "recipe", "r", "--from", "quickstar", "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown recipe template 'quickstar'; did you mean 'quickstart'?" in result.output
    assert runner.invoke(cli, ["new", "recipe", "r"]).exit_code == 2  # no --from
    assert runner.invoke(cli, ["new", "recipe", "--from", "quickstart"]).exit_code == 2  # no NAME
    bad = runner.invoke(cli, ["new", "recipe", "no good", "--from", "quickstart", "-o", str(tmp_path)])
    assert bad.exit_code == 2 and "recipe name 'no good'" in bad.output


def test_new_recipe_copies_included_files(tmp_path, monkeypatch):
    templates = tmp_path / "templates"
    (templates / "common").mkdir(parents=True)
    (templates / "common" / "base.toml").write_text('[train]\nsteps = 3\n')
    (templates / "child.toml").write_text('# Child.\ninclude = "common/base.toml"\n[loss]\nuse = "sft"\n')
    monkeypatch.setattr(scaffold, "recipe_templates", lambda: {"child": templates / "child.toml"})
    written = scaffold.new_recipe("mine", "child", tmp_path / "out.toml")
    assert written == [tmp_path / "out.toml", tmp_path / "common" / "base.toml"]
    assert (tmp_path / "common" / "base.toml").read_text() == '[train]\nsteps = 3\n'


@pytest.mark.slow
def test_scaffolded_recipe_trains(tmp_path, tiny_model_dir):
    (path,) = scaffold.new_recipe("short", "quickstart", tmp_path)
    rows = testing.run_recipe(path, steps=1, model=tiny_model_dir, output_dir=tmp_path / "run",
                              overrides=["train.prompts_per_step=2", "train.group_size=2"])
    assert [(r["stage"], r["step"]) for r in rows] == [("warmup", 0), ("rl", 1)]


# ------------------------------------------------------------------------------------ new plugin
def test_plugin_names_are_checked():
    names = scaffold.plugin_names("rlctl-My-plugin")
    assert (names.dist, names.module, names.cls) == ("rlctl-My-plugin", "rlctl_my_plugin", "RlctlMyPlugin")
    for bad in ("1plugin", "my plugin", "my.plugin", "", "json", "class", "rlctl", "-x"):
        with pytest.raises(RlctlError):
            scaffold.plugin_names(bad)
    assert scaffold.parse_kinds(["loss,reward", "reward"]) == ("reward", "loss")
    assert scaffold.parse_kinds([]) == ("reward",)
    assert scaffold.parse_kinds(["all"]) == scaffold.PLUGIN_KINDS


def test_new_plugin_writes_a_complete_package(runner, tmp_path, monkeypatch, fresh_registry):
    result = runner.invoke(cli, ["new", "plugin", "rlctl-probe-all", "--kind", "all", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    root = tmp_path / "rlctl-probe-all"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [".gitignore", "README.md", "pyproject.toml", "recipes/example.toml",
                     "src/rlctl_probe_all/__init__.py", "src/rlctl_probe_all/plugin.py",
                     "tests/test_rlctl_probe_all.py"]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["name"] == "rlctl-probe-all"
    assert project["project"]["entry-points"]["rlctl"] == {"rlctl_probe_all": "rlctl_probe_all.plugin"}
    for path in root.rglob("*.py"):
        compile(path.read_text(), str(path), "exec")
        assert all(len(line) <= 110 for line in path.read_text().splitlines()), path
    assert "$" not in "".join(p.read_text() for p in root.rglob("*") if p.is_file())  # all filled in
    # with the module registered, the example recipe validates against the components' signatures
    module = _import_scaffolded(root, "rlctl_probe_all", monkeypatch)
    with testing.registered(module):
        recipe = load_recipe(root / "recipes" / "example.toml")
        specs = recipe.stages[0].components
        assert {k: (v[0] if isinstance(v, list) else v).use for k, v in specs.items()} == dict.fromkeys(
            ("sampler", "reward", "advantage", "loss", "scheduler"), "rlctl_probe_all")
    assert "rlctl_probe_all" not in plugins.available("reward")  # unregistered after the block


def test_new_plugin_defaults_and_errors(runner, tmp_path):
    result = runner.invoke(cli, ["new", "plugin", "my-reward", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    plugin_py = (tmp_path / "my-reward" / "src" / "my_reward" / "plugin.py").read_text()
    assert "def rlctl_register_rewards" in plugin_py and "rlctl_register_losses" not in plugin_py
    recipe = (tmp_path / "my-reward" / "recipes" / "example.toml").read_text()
    assert 'use = "my_reward"' in recipe and 'use = "ppo_clip"' in recipe
    again = runner.invoke(cli, ["new", "plugin", "my-reward", "-o", str(tmp_path)])
    assert again.exit_code == 2 and "already exists and is not empty; pass --force" in again.output
    assert runner.invoke(cli, ["new", "plugin", "my-reward", "-o", str(tmp_path), "--force"]).exit_code == 0
    bad_kind = runner.invoke(cli, ["new", "plugin", "x1", "--kind", "critic", "-o", str(tmp_path)])
    assert bad_kind.exit_code == 2 and "--kind 'critic': accepted kinds are" in bad_kind.output
    bad_name = runner.invoke(cli, ["new", "plugin", "os", "-o", str(tmp_path)])
    assert bad_name.exit_code == 2 and "would shadow an existing module" in bad_name.output


@pytest.mark.slow
def test_scaffolded_plugin_installs_lists_and_trains(runner, tmp_path, tiny_model_dir, fresh_registry,
                                                     monkeypatch):
    """pip install the generated package, find it with `rlctl plugins`, train with it, uninstall."""
    dist = f"rlctl-scaffold-probe-{os.getpid()}"  # unique: the environment may be shared
    module = dist.replace("-", "_")
    kinds = "sampler,reward,advantage,loss,scheduler"  # no observer: it would fire in every run meanwhile
    root = scaffold.new_plugin(dist, [kinds], tmp_path)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored afterwards, with what the install adds
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    install = subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(root)],
                             capture_output=True, text=True, timeout=300)
    try:
        assert install.returncode == 0, install.stdout + install.stderr
        # a new process, as a user would run it: the entry point and the editable install are found
        listing = subprocess.run([sys.executable, "-m", "rlctl.cli", "plugins", "--verbose"],
                                 capture_output=True, text=True, timeout=300)
        assert listing.returncode == 0, listing.stderr
        headers = [line for line in listing.stdout.splitlines() if line.endswith(f"package {dist} 0.1.0)")]
        assert headers == [f"{kind} {module}  (plugin {module}, package {dist} 0.1.0)" for kind in kinds.split(",")]
        assert "REINFORCE" in listing.stdout and 'aggregation   str    = "token-mean"' in listing.stdout
        assert "failed:" not in listing.stderr

        # in this process: pick up the editable install's path (read at start-up), reload the plugins
        for file in metadata.distribution(dist).files or []:
            if file.name.endswith(".pth"):
                site.addpackage(str(file.locate().parent), file.name, None)
        plugins.reset()
        assert plugins.registry().get("loss", module).package == dist
        rows = testing.run_recipe(root / "recipes" / "example.toml", steps=2, model=tiny_model_dir,
                                  output_dir=tmp_path / "run",
                                  overrides=["train.prompts_per_step=2", "train.group_size=2"])
        assert [r["step"] for r in rows] == [0, 1]
        assert f"reward/{module}" in rows[0] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    finally:
        subprocess.run([*pip, "uninstall", "-y", dist], capture_output=True, timeout=300)
        for name in (module, f"{module}.plugin"):
            sys.modules.pop(name, None)
    plugins.reset()
    assert module not in {ep.name for ep in metadata.entry_points(group="rlctl")}


@pytest.mark.slow
def test_scaffolded_plugin_tests_pass(tmp_path):
    """The generated tests (built on rlctl.testing) pass as generated, before the package is installed."""
    root = scaffold.new_plugin("rlctl-probe-tests", ["all"], tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 skipped" in result.stdout  # the entry-point test needs `pip install -e .`
    assert " passed" in result.stdout


# ------------------------------------------------------------------------------ plugins --verbose
def test_plugins_verbose_shows_options_and_descriptions(runner):
    result = runner.invoke(cli, ["plugins", "--verbose"])
    assert result.exit_code == 0, result.output
    blocks = {block.splitlines()[0].split("  (")[0]: block for block in result.stdout.split("\n\n")}
    grpo = blocks["advantage grpo"]
    assert "(plugin rlctl_plugins.grpo, package rlctl " in grpo
    assert 'GRPO ("DeepSeekMath: Pushing the Limits' in grpo.splitlines()[1]
    assert any(line.split() == ["std_scope", "str", "=", '"group"'] for line in grpo.splitlines())
    assert any(line.split() == ["eps", "float", "=", "1e-06"] for line in grpo.splitlines())
    ppo_clip = blocks["loss ppo_clip"].splitlines()
    assert any(line.split() == ["clip_high", "float", "|", "None", "(unset)"] for line in ppo_clip)
    assert "(no options)" in blocks["advantage rloo"]
    only = runner.invoke(cli, ["plugins", "-v", "--kind", "scheduler"]).stdout
    assert "scheduler cosine" in only and "loss " not in only


def test_describe_factory_reads_the_signature():
    def factory(threshold: float, name: str = "x", flag: bool = False, **rest):
        """Score by threshold.

        More detail that is not part of the summary.
        """

    info = scaffold.describe_factory(factory)
    assert info.summary == "Score by threshold."
    assert [(o.name, o.type_text(), o.default_text()) for o in info.options] == [
        ("threshold", "float", "required"), ("name", "str", '"x"'), ("flag", "bool", "false")]
    assert info.takes_any
    lines = scaffold.format_options(info)
    assert lines[0].split() == ["threshold", "float", "(required)"]
    assert lines[-1].strip() == "(also accepts any other key)"


# ------------------------------------------------------------------- component errors at the CLI
def _entry_point_plugin(tmp_path, monkeypatch, dist: str, ep_name: str, module: str, source: str) -> None:
    """A throwaway distribution on sys.path whose `rlctl` entry point names ``module``."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(f"[rlctl]\n{ep_name} = {module}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, module, raising=False)
    plugins.reset()


@pytest.mark.slow
def test_run_reports_a_failing_component_in_one_line(runner, tmp_path, tiny_model_dir, monkeypatch,
                                                     fresh_registry):
    _entry_point_plugin(tmp_path, monkeypatch, "rlctl-boom", "boom", "rlctl_boom_plugin", """
        from rlctl import hookimpl

        class Boom:
            requires = ("rewards",)

            def compute(self, rollouts):
                raise RuntimeError("kaboom")

        @hookimpl
        def rlctl_register_advantages(register):
            register("boom", Boom)
    """)
    text = grpo_recipe(tiny_model_dir, steps=1).replace('[advantage]\nuse = "grpo"', '[advantage]\nuse = "boom"')
    path = write_recipe(tmp_path, text)
    result = runner.invoke(cli, ["run", str(path), "-o", str(tmp_path / "run"), "-q"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in errors if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    line = errors[0]
    assert "advantage 'boom'" in line and "plugin boom" in line and "[advantage]" in line
    assert "RuntimeError: kaboom" in line
    assert "Traceback" not in result.output


# -------------------------------------------------------------------------------- rlctl.testing
def test_fake_rollouts_builds_masks_groups_and_fields():
    batch = testing.fake_rollouts(rewards=[1, 0, 1, 1], group_size=2, lengths=[3, 1, 2, 2])
    assert len(batch) == 4 and batch.group_ids.tolist() == [0, 0, 1, 1]
    assert batch.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert (batch.completion_ids[batch.completion_mask == 1] >= 4).all()  # never a special token
    assert (batch.completion_ids[batch.completion_mask == 0] == 0).all()  # padding
    assert batch.rewards.dtype == torch.float32 and batch.prompts == ["prompt 0", "prompt 0", "prompt 1", "prompt 1"]
    assert batch.input_ids.shape == (4, 6) and batch.attention_mask.shape == (4, 6)

    from rlctl_plugins.grpo import GroupRelativeAdvantage

    adv = GroupRelativeAdvantage().compute(testing.fake_rollouts(rewards=[1, 0, 0, 1], group_size=2))
    assert torch.allclose(adv[:, 0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-4)

    per_token = testing.fake_rollouts(advantages=[1.0, -1.0], old_logprobs=-0.5, lengths=[3, 2])
    assert per_token.advantages.tolist() == [[1, 1, 1], [-1, -1, 0]]
    assert per_token.old_logprobs.tolist() == [[-0.5] * 3, [-0.5, -0.5, 0.0]]
    grouped = testing.fake_rollouts(num_samples=4, group_size=2, answers=["3", "5"], completions=list("abcd"))
    assert [i["answer"] for i in grouped.info] == ["3", "3", "5", "5"]
    process = testing.fake_rollouts(rewards=[[0.0, 1.0], [1.0, 0.0]])
    assert process.completion_mask.shape == (2, 2)
    with pytest.raises(ValueError, match="disagree"):
        testing.fake_rollouts(rewards=[1, 0], lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="groups of 3"):
        testing.fake_rollouts(rewards=[1, 0], group_size=3)
    with pytest.raises(TypeError, match="unknown fields"):
        testing.fake_rollouts(advantage=[1.0])


def test_registered_adds_components_for_a_block(fresh_registry):
    module = types.ModuleType("rlctl_probe_inline")

    class Half:
        def score(self, rollouts):
            return torch.full((len(rollouts),), 0.5)

    @hookimpl
    def rlctl_register_rewards(register):
        register("probe_half", Half)

    module.rlctl_register_rewards = rlctl_register_rewards
    with testing.registered(module):
        comp = plugins.registry().get("reward", "probe_half")
        assert comp.plugin == "rlctl_probe_inline" and comp.factory is Half
        with testing.registered(module):  # already registered: left as it is
            assert "probe_half" in plugins.available("reward")
    assert "probe_half" not in plugins.available("reward")

    typo = types.ModuleType("rlctl_probe_typo")
    typo.rlctl_register_reward = hookimpl(lambda register: None)
    with pytest.raises(RlctlError, match="rlctl_register_reward"):
        with testing.registered(typo):
            pass
    assert "exact" in plugins.available("reward")


@pytest.mark.slow
def test_run_recipe_from_text_with_an_inline_plugin(tmp_path, tiny_model_dir, fresh_registry):
    module = types.ModuleType("rlctl_probe_text")

    class Constant:
        def score(self, rollouts):
            return torch.ones(len(rollouts))

    module.rlctl_register_rewards = hookimpl(lambda register: register("probe_one", Constant))
    text = grpo_recipe(tiny_model_dir, steps=5).replace('use = "exact"', 'use = "probe_one"')
    rows = testing.run_recipe(text, steps=1, output_dir=tmp_path / "run", plugins=[module])
    assert len(rows) == 1 and rows[0]["reward/probe_one"] == 1.0
    with pytest.raises(RlctlError, match="already holds a run"):
        testing.run_recipe(text, steps=1, output_dir=tmp_path / "run", plugins=[module])


@pytest.mark.slow
def test_scaffolded_environment_installs_and_runs(runner, tmp_path, fresh_registry):
    """`rlctl new environment`: the package pip-installs, rlctl lists its environment, and its example
    recipe trains multi-turn with it in a new process, as a user would run it."""
    dist = f"rlctl-env-probe-{os.getpid()}"
    module = dist.replace("-", "_")
    result = runner.invoke(cli, ["new", "environment", dist, "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    root = tmp_path / dist
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    install = subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(root)],
                             capture_output=True, text=True, timeout=300)
    try:
        assert install.returncode == 0, install.stdout + install.stderr
        listing = subprocess.run([sys.executable, "-m", "rlctl.cli", "plugins"], capture_output=True, text=True,
                                 timeout=300)
        assert any(line.split()[:2] == ["environment", module] for line in listing.stdout.splitlines()), \
            listing.stdout[-2000:]
        run = subprocess.run([sys.executable, "-m", "rlctl.cli", "run", str(root / "recipes" / "example.toml"),
                              "--output-dir", str(tmp_path / "run"), "--set", "train.steps=2",
                              "--set", "train.prompts_per_step=2", "--set", "train.group_size=2"],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "eval" not in r]
        assert [r["step"] for r in steps] == [0, 1] and all(r["turns"] >= 1 for r in steps)
        assert all("reward/env_return" in r for r in steps)
    finally:
        subprocess.run([*pip, "uninstall", "-y", dist], capture_output=True, timeout=300)
    plugins.reset()
