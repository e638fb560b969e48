"""Launching: ``rlctl run --processes N``, torchrun on two simulated nodes, the engine a run reports, what is
refused, and ranks that build the tiny model into an empty cache at the same time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import TINY, grpo_recipe, write_recipe
from rlctl.cli import cli
from rlctl.errors import RlctlError
from test_distributed import RECIPE, free_port, install_probe, launch

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")  # installed with torch
SHORT_QUICKSTART = ["--set", "stage.0.steps=2", "--set", "stage.1.steps=2", "--set", "eval.num_prompts=4"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        env.pop(key, None)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _rlctl(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlctl", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300, check=False)


def _tiny_recipe(steps: int = 1) -> str:
    tiny = ", ".join(f"{k} = {json.dumps(v)}" for k, v in TINY.items())
    return grpo_recipe(Path("unused"), steps=steps).replace('name = "unused"', f"tiny = {{ {tiny} }}")


# --------------------------------------------------------------------------------- refused at once
@pytest.mark.parametrize("flag, named", [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed is not supported"),
                                         ("ACCELERATE_USE_FSDP", "accelerate's FSDP is not supported")])
def test_deepspeed_and_accelerate_fsdp_are_refused_naming_fsdp2(flag, named, monkeypatch, tmp_path):
    from rlctl.train.engine import Engine

    monkeypatch.setenv(flag, "true")
    with pytest.raises(RlctlError, match=named) as caught:
        Engine("cpu", "no", [], str(tmp_path))
    assert '[train] engine = "fsdp2"' in str(caught.value) and "\n" not in str(caught.value)


def test_a_single_process_engine_describes_itself(tmp_path):
    from rlctl.train.engine import Engine
    from rlctl.train.outputs import engine_line

    described = Engine("cpu", "no", [], str(tmp_path)).describe()
    assert described == {"name": "single", "processes": 1, "backend": None, "device": "cpu", "threads": None,
                         "threads_why": ""}
    assert engine_line(described) == "engine: single process (cpu)"
    ddp = {"name": "ddp", "processes": 2, "backend": "gloo", "device": "cpu", "threads": 1,
           "threads_why": "physical cores available / 2 processes; [train] threads overrides"}
    assert engine_line(ddp) == ("engine: ddp, 2 processes (gloo, cpu); 1 torch thread per process (physical "
                                "cores available / 2 processes; [train] threads overrides)")


def test_processes_that_cannot_share_the_batch_are_refused_before_launching(tiny_model_dir, tmp_path):
    path = write_recipe(tmp_path, grpo_recipe(tiny_model_dir))  # prompts_per_step = 4
    result = CliRunner().invoke(cli, ["run", str(path), "-o", str(tmp_path / "out"), "--processes", "3"])
    assert result.exit_code == 2, result.output
    expected = ("error: --processes 3: [train] prompts_per_step = 4 must be a multiple of the number of processes "
                "so that every process gets whole groups")
    assert result.output.strip().splitlines() == [expected]
    assert not (tmp_path / "out").exists()


def test_processes_beyond_the_gpus_are_one_line(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    path = write_recipe(tmp_path, grpo_recipe(tiny_model_dir))
    result = CliRunner().invoke(cli, ["run", str(path), "-o", str(tmp_path / "out"), "--processes", "2"])
    assert result.exit_code == 2, result.output
    assert "error: --processes 2: this machine has 1 GPU(s)" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_processes_inside_a_launcher_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = write_recipe(tmp_path, grpo_recipe(tiny_model_dir))
    result = CliRunner().invoke(cli, ["run", str(path), "-o", str(tmp_path / "out"), "--processes", "2"])
    assert result.exit_code == 2 and "already one of 2 started by a launcher" in result.output, result.output


def test_a_killed_builder_leaves_nothing_that_stays(tmp_path):
    from rlctl.models import build_tiny_model

    out = tmp_path / "models" / "tiny"
    stale = tmp_path / "models" / ".tiny.tmp-killed"  # what a builder killed half-way leaves
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{")
    build_tiny_model(out, hidden_size=16, num_layers=1, num_heads=2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # the lock lives in the rlctl cache
    assert {"config.json", "model.safetensors", "rlctl_tiny.json"} <= {p.name for p in out.iterdir()}


# ------------------------------------------------------------------------------------- launching
@pytest.mark.slow
def test_processes_1_is_a_plain_run_that_records_its_engine(tiny_model_dir, tmp_path):
    path = write_recipe(tmp_path, grpo_recipe(tiny_model_dir, steps=1))
    result = CliRunner().invoke(cli, ["run", str(path), "-o", str(tmp_path / "out"), "-q", "--processes", "1"])
    assert result.exit_code == 0, result.output
    assert "engine: single process (cpu)" in result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["engine"] == "single" and summary["processes"] == 1


@pytest.mark.slow
def test_a_failing_process_is_one_error_line_and_a_nonzero_exit(tiny_model_dir, tmp_path):
    path = write_recipe(tmp_path, grpo_recipe(tiny_model_dir, steps=1))
    result = _rlctl("run", str(path), "-o", str(tmp_path / "out"), "-q", "--processes", "2",
                    env=_env(ACCELERATE_USE_DEEPSPEED="true"))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    assert any("DeepSpeed is not supported" in line for line in lines)
    assert lines[-1].startswith("error: process ") and "failed with exit code 2" in lines[-1]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


def _one_complete_model(cache: Path) -> Path:
    """The cache holds one complete tiny model directory and nothing else (locks are kept apart)."""
    models = cache / "models"
    dirs = [p for p in models.iterdir() if p.is_dir()]
    assert len(dirs) == 1, sorted(p.name for p in models.iterdir())
    (model,) = dirs
    assert sorted(p.name for p in models.iterdir()) == [model.name]
    names = {p.name for p in model.iterdir()}
    assert {"rlctl_tiny.json", "config.json", "model.safetensors", "tokenizer.json"} <= names, names
    assert not [p for p in cache.rglob("*") if "tmp" in p.name], list(cache.rglob("*"))
    return model


@pytest.mark.slow
def test_two_ranks_build_the_tiny_model_into_an_empty_cache(tmp_path):
    path = write_recipe(tmp_path, _tiny_recipe(steps=1))
    for attempt in range(3):
        cache = tmp_path / f"cache{attempt}"
        result = subprocess.run([TORCHRUN, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
                                 "rlctl", "run", str(path), "-o", str(tmp_path / f"run{attempt}"), "-q"],
                                env=_env(RLCTL_CACHE=str(cache)), capture_output=True, text=True, timeout=300,
                                check=False)
        assert result.returncode == 0, f"attempt {attempt}: " + result.stdout[-3000:] + result.stderr[-3000:]
        _one_complete_model(cache)


@pytest.mark.slow
def test_quickstart_with_processes_2_on_an_empty_cache(tmp_path):
    cache = tmp_path / "cache"
    result = _rlctl("run", "quickstart", "--processes", "2", "-o", str(tmp_path / "qs"), "-q", *SHORT_QUICKSTART,
                    env=_env(RLCTL_CACHE=str(cache)), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.count("engine: ddp, 2 processes (gloo, cpu)") == 1, result.stderr  # the main process
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["engine"] == "ddp" and summary["processes"] == 2 and summary["steps"] == 4
    _one_complete_model(cache)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["auto", "fsdp2"])
def test_two_simulated_nodes_train_like_one_process(engine, tiny_model_dir, tmp_path):
    """torchrun on two "nodes" (one process each) meeting at a c10d rendezvous on 127.0.0.1, as on a
    cluster; with DDP and with parameters sharded across the two nodes (FSDP2)."""
    install_probe(tmp_path / "site")
    recipe = write_recipe(tmp_path, RECIPE.format(model=tiny_model_dir, sampler="fixed",
                                                  aggregation="seq-mean-token-mean"))
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
               RLCTL_SHARED_PROMPTS="0")  # as in test_distributed: the same forward in both layouts
    launch([sys.executable, "-m", "rlctl", "run", str(recipe), "-o", str(tmp_path / "one"), "-q"], env,
           tmp_path / "p1")

    (tmp_path / "p2").mkdir()
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
                               "-m", "rlctl", "run", str(recipe), "-o", str(tmp_path / "two"), "-q",
                               "--set", f"train.engine={engine}"],
                              env={**env, "PROBE_DIR": str(tmp_path / "p2")}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert sorted(p.name for p in (tmp_path / "p2").iterdir()) == [f"adv-{s}-{r}.pt" for s in (0, 1) for r in (0, 1)]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["engine"] == ("ddp" if engine == "auto" else "fsdp2") and summary["processes"] == 2

    from safetensors.torch import load_file

    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any((one[k] - start[k]).abs().max() > 1e-4 for k in one)  # training moved the weights
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4, msg=key)
