"""The errors a new user meets first, when loading a model: one line naming the key, exit code 2, no
traceback. And the GGUF import: converted once, under a lock, safe with several processes."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import time

import pytest
from click.testing import CliRunner

from conftest import grpo_recipe, write_recipe
from rlctl.cli import cli


def _one_line_error(args, expected: str, env=None):
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip() and line.startswith("error")]
    assert len(lines) == 1 and expected in lines[0], result.output
    return lines[0]


def test_a_model_directory_that_does_not_exist(tmp_path):
    recipe = write_recipe(tmp_path, grpo_recipe(tmp_path / "no" / "such-model"))
    for command in ("validate", "run"):
        line = _one_line_error([command, str(recipe)], "[model] name =")
        assert "no such directory" in line


def test_a_hub_name_offline_says_no_network_was_reached(tmp_path, monkeypatch):
    recipe = write_recipe(tmp_path, grpo_recipe("HuggingFaceTB/no-such-model-rlctl"))
    started = time.perf_counter()
    line = _one_line_error(["run", str(recipe), "-o", str(tmp_path / "run")], "[model] name =",
                           env={"HF_HUB_OFFLINE": "1"})
    assert "no network reached" in line and "local-dir" in line
    assert time.perf_counter() - started < 30  # no retry loop against an unreachable host


def test_a_gguf_file_without_the_gguf_package(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    recipe = write_recipe(tmp_path, grpo_recipe("x").replace('name = "x"', f'gguf_file = "{fake}"'))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    line = _one_line_error(["run", str(recipe), "-o", str(tmp_path / "run")], "[model] gguf_file")
    assert "pip install" in line and "gguf" in line


def test_a_gguf_file_that_does_not_exist(tmp_path):
    recipe = write_recipe(tmp_path, grpo_recipe("x").replace('name = "x"', 'gguf_file = "missing.gguf"'))
    _one_line_error(["validate", str(recipe)], "[model] gguf_file = 'missing.gguf': no such file")
    recipe = write_recipe(tmp_path, grpo_recipe("x").replace('name = "x"', 'gguf_file = "no_such_pkg_rlctl:m.gguf"'))
    _one_line_error(["validate", str(recipe)], "no installed Python package 'no_such_pkg_rlctl'")


def test_chat_template_without_one_in_the_tokenizer(tiny_model_dir, tmp_path):
    text = grpo_recipe(tiny_model_dir).replace('max_new_tokens = 4', 'max_new_tokens = 4\nchat_template = true')
    line = _one_line_error(["run", str(write_recipe(tmp_path, text)), "-o", str(tmp_path / "run")],
                           "[sampler] chat_template = true")
    assert "no chat template" in line


def _tokenizer_without(model_dir, tmp_path, keys):
    """A copy of ``model_dir`` whose tokenizer_config.json lacks ``keys``."""
    import shutil

    copy = tmp_path / ("no-" + "-".join(keys))
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    for key in keys:
        config.pop(key, None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    return copy


def test_a_tokenizer_without_eos(tiny_model_dir, tmp_path):
    broken = _tokenizer_without(tiny_model_dir, tmp_path, ["eos_token", "pad_token"])
    line = _one_line_error(["run", str(write_recipe(tmp_path, grpo_recipe(broken))), "-o", str(tmp_path / "run")],
                           "[model] name =")
    assert "no EOS token" in line


def test_a_tokenizer_without_pad_uses_eos(tiny_model_dir, tmp_path):
    from rlctl.models import load_policy
    from rlctl.recipe import ModelConfig

    _, tokenizer = load_policy(ModelConfig(name=str(_tokenizer_without(tiny_model_dir, tmp_path, ["pad_token"]))))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None


# ------------------------------------------------------------------------------- GGUF import
def _convert_slowly(source, out):
    """Stands in for the dequantisation (30 s on the real model): counts conversions, takes a while."""
    with open(out.parent / "conversions.log", "a") as log:
        log.write("converted\n")
    time.sleep(1.0)
    (out / "config.json").write_text("{}")


def _import_in_child(source, cache, queue):
    import os

    os.environ["RLCTL_CACHE"] = str(cache)
    import rlctl.model_import as model_import

    model_import._convert = _convert_slowly
    model_import.require_gguf = lambda *a: None
    queue.put(str(model_import.import_gguf(source)))


def test_gguf_import_converts_once_with_several_processes(tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF" + bytes(range(200)))
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    children = [ctx.Process(target=_import_in_child, args=(source, cache, queue)) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    results = {queue.get(timeout=5) for _ in children}
    assert len(results) == 1  # every process got the same directory
    (out,) = results
    models = cache / "models"
    assert (models / "conversions.log").read_text().count("converted") == 1
    assert json.loads((models / out.split("/")[-1] / "rlctl_import.json").read_text())["source"] == "m.gguf"
    leftovers = [p.name for p in models.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no half-written temporary directory stays behind


def test_gguf_import_never_replaces_a_directory_it_did_not_write(tmp_path, monkeypatch):
    import rlctl.model_import as model_import
    from rlctl.errors import RecipeError

    monkeypatch.setattr(model_import, "_convert", _convert_slowly)
    monkeypatch.setattr(model_import, "require_gguf", lambda *a: None)
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF")
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    with pytest.raises(RecipeError, match="not written by rlctl"):
        model_import.import_gguf(source, users)
    assert (users / "notes.txt").read_text() == "keep me"
