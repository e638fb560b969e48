"""The command line: validate, plugins, run, and one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import grpo_recipe, write_recipe
from rlctl.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


def test_help_everywhere(runner):
    for args in ([], ["run"], ["validate"], ["plugins"], ["tiny-model"]):
        result = runner.invoke(cli, [*args, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output


def test_validate_prints_the_resolved_recipe(runner, tiny_model_dir, tmp_path):
    path = write_recipe(tmp_path, grpo_recipe(tiny_model_dir))
    result = runner.invoke(cli, ["validate", str(path), "--set", "loss.clip_high=0.3"])
    assert result.exit_code == 0, result.output
    assert 'use = "ppo_clip"' in result.output and "clip_high = 0.3" in result.output
    assert "group_size = 4" in result.output and "ppo_epochs = 1" in result.output  # defaults shown


def test_bad_recipe_is_one_line_with_exit_code_2(runner, tiny_model_dir, tmp_path):
    path = write_recipe(tmp_path, grpo_recipe(tiny_model_dir).replace("[advantage]\nuse = \"grpo\"",
                                                                      "[advantage]\nuse = \"grpo\"\nstd_scop = 1"))
    result = runner.invoke(cli, ["validate", str(path)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {path}: [advantage] std_scop: unknown key; did you mean 'std_scope'? "
                     "Accepted: " + lines[0].split("Accepted: ")[1]]
    assert "Traceback" not in result.output


def test_missing_recipe_file(runner, tmp_path):
    result = runner.invoke(cli, ["run", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "recipe file not found" in result.output


def test_plugins_lists_builtins_by_kind(runner):
    result = runner.invoke(cli, ["plugins"])
    assert result.exit_code == 0
    rows = [line for line in result.output.splitlines() if "rlctl_plugins" in line]
    assert any("advantage" in r and "grpo" in r for r in rows)
    assert any("loss" in r and "ppo_clip" in r for r in rows)
    assert any("sampler" in r and " hf " in r for r in rows)
    result = runner.invoke(cli, ["plugins", "--kind", "scheduler"])
    assert "cosine" in result.output and "ppo_clip" not in result.output


@pytest.mark.slow
def test_run_trains_and_prints_a_summary(runner, tiny_model_dir, tmp_path):
    path = write_recipe(tmp_path, grpo_recipe(tiny_model_dir, steps=2))
    out = tmp_path / "out"
    result = runner.invoke(cli, ["run", str(path), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert "run summary" in result.output
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    again = runner.invoke(cli, ["run", str(path), "-o", str(out), "-q"])
    assert again.exit_code == 2 and "already holds a run; pass --overwrite" in again.output


@pytest.mark.slow
def test_interrupt_exits_130_and_resume_finishes(runner, tiny_model_dir, tmp_path):
    import os
    import signal

    from rlctl import hookimpl, plugins
    from rlctl.metrics import read_metrics

    class InterruptFirstStep:
        @hookimpl
        def rlctl_on_step_end(self, state, metrics):
            if metrics["step"] == 0:
                os.kill(os.getpid(), signal.SIGINT)

    path = write_recipe(tmp_path, grpo_recipe(tiny_model_dir, steps=3))
    out = tmp_path / "out"
    observer = InterruptFirstStep()
    plugins.registry().manager.register(observer)
    try:
        result = runner.invoke(cli, ["run", str(path), "-o", str(out), "-q"])
    finally:
        plugins.registry().manager.unregister(observer)
    assert result.exit_code == 130, result.output
    assert f"--output-dir {out} --resume latest" in result.output
    resumed = runner.invoke(cli, ["run", str(path), "-o", str(out), "-q", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "eval" not in r] == [0, 1, 2]


@pytest.mark.slow
def test_eval_and_report_commands(runner, tiny_model_dir, tmp_path):
    path = write_recipe(tmp_path, grpo_recipe(tiny_model_dir, steps=2))
    out = tmp_path / "out"
    assert runner.invoke(cli, ["run", str(path), "-o", str(out), "-q"]).exit_code == 0
    result = runner.invoke(cli, ["eval", str(out), "--k", "1", "--k", "2", "--num-prompts", "4"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "eval.json").read_text())
    assert set(record) >= {"accuracy", "pass@1", "pass@2"} and record["num_prompts"] == 4
    assert "pass@2" in result.output
    bad = runner.invoke(cli, ["eval", str(out), "--k", "4", "--samples", "2"])
    assert bad.exit_code == 2 and "fewer than the largest --k 4" in bad.output
    result = runner.invoke(cli, ["report", str(out), "-o", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.png").stat().st_size > 10_000 and "final reward" in result.output
