"""The FSDP2 engine, for real: two CPU processes (torchrun, gloo) with parameters, gradients and
optimizer states sharded by ``fully_shard``, against one unsharded process on the same batches."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_recipe
from test_distributed import RECIPE, free_port, install_probe, launch

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path):
    install_probe(tmp_path / "site")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "RLCTL_SHARED_PROMPTS": "0"}


def _torchrun(*args):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "rlctl", "run", *args]


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def _assert_same_weights(a, b, atol=2e-5, rtol=1e-4):
    assert sorted(a) == sorted(b)  # the same keys: a full HF model, tied weights saved once
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=atol, rtol=rtol, msg=key)


@pytest.mark.parametrize("extra", [
    [],  # ppo_clip, token-free seq-mean aggregation, reinforce_pp advantages
    ["--set", "loss.kl_coef=0.1", "--set", "loss.aggregation=token-mean", "--set", "train.micro_batch_size=3"],
])
def test_two_sharded_processes_train_like_one_unsharded(extra, tiny_model_dir, tmp_path, env):
    """Same final weights (float tolerance); with a KL term the frozen reference is a sharded copy."""
    recipe = write_recipe(tmp_path, RECIPE.format(model=tiny_model_dir, sampler="ragged", aggregation="seq-mean-token-mean"))
    launch([sys.executable, "-m", "rlctl", "run", str(recipe), "-o", str(tmp_path / "one"), "-q", *extra], env,
           tmp_path / "p1")
    launch(_torchrun(str(recipe), "-o", str(tmp_path / "two"), "-q", "--set", "train.engine=fsdp2", *extra), env,
           tmp_path / "p2")
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any((one[k] - start[k]).abs().max() > 1e-4 for k in one)  # training moved the weights
    _assert_same_weights(one, two)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["engine"] == "fsdp2" and summary["processes"] == 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")  # a plain HF model


def test_sharded_checkpoint_resumes_exactly(tiny_model_dir, tmp_path, env):
    """A run resumed from its step-2 checkpoint (full policy, optimizer shards through
    torch.distributed.checkpoint, every process's RNG) ends with the weights of the uninterrupted run."""
    import shutil

    text = RECIPE.format(model=tiny_model_dir, sampler="fixed", aggregation="token-mean").replace(
        "steps = 2", "steps = 4\nsave_every = 2\nkeep_checkpoints = 4")
    recipe, run = write_recipe(tmp_path, text), tmp_path / "run"
    launch(_torchrun(str(recipe), "-o", str(run), "-q", "--set", "train.engine=fsdp2"), env, tmp_path / "p1")
    uninterrupted = _weights(run)
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-000002", "step-000004"]
    assert (checkpoints[0] / "optimizer").is_dir() and (checkpoints[0] / "policy" / "model.safetensors").exists()
    shutil.rmtree(checkpoints[1])  # as if the run had died after step 2
    shutil.rmtree(run / "final")
    launch(_torchrun(str(recipe), "-o", str(run), "-q", "--set", "train.engine=fsdp2", "--resume", "latest"), env,
           tmp_path / "p2")
    _assert_same_weights(uninterrupted, _weights(run), atol=1e-6, rtol=1e-6)


def test_value_head_trains_sharded(tiny_model_dir, tmp_path, env):
    """PPO with a value head under FSDP2 equals one process (policy and value head)."""
    text = RECIPE.format(model=tiny_model_dir, sampler="fixed", aggregation="token-mean").replace(
        'use = "reinforce_pp"      # whitened over the whole batch: wrong if computed per process',
        'use = "gae"').replace('use = "ppo_clip"', 'use = "ppo"')
    recipe = write_recipe(tmp_path, text)
    launch([sys.executable, "-m", "rlctl", "run", str(recipe), "-o", str(tmp_path / "one"), "-q"], env, tmp_path / "p1")
    launch(_torchrun(str(recipe), "-o", str(tmp_path / "two"), "-q", "--set", "train.engine=fsdp2"), env,
           tmp_path / "p2")
    _assert_same_weights(_weights(tmp_path / "one"), _weights(tmp_path / "two"))
    heads = [load_file(str(tmp_path / run / "final" / "value_head.safetensors")) for run in ("one", "two")]
    _assert_same_weights(*heads)
    assert heads[0]["proj.weight"].abs().max() > 0  # it trained (it starts at zero)


def _eager_eos_model(tiny_model_dir, path):
    """A copy of the tiny model whose EOS logit is large at about half of all positions: completions end
    after a random number of tokens, so processes finish decoding at different steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eos = model.config.eos_token_id
    with torch.no_grad():
        direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        model.get_output_embeddings().weight[eos] = 1.0 * direction / direction.norm() * model.config.hidden_size ** 0.5
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_decoding_runs_in_lockstep_when_processes_finish_at_different_steps(tiny_model_dir, tmp_path, env):
    """Sampling and greedy evaluation with the hf sampler: every forward of a sharded model is a
    collective, so a process whose completions all ended keeps stepping until every process is done."""
    model = _eager_eos_model(tiny_model_dir, tmp_path / "eager")
    text = RECIPE.format(model=model, sampler="hf", aggregation="token-mean").replace(
        'use = "hf"', 'use = "hf"\nmax_new_tokens = 12').replace("num_eval = 4", "num_eval = 7")
    recipe = write_recipe(tmp_path, text)
    launch(_torchrun(str(recipe), "-o", str(tmp_path / "two"), "--set", "train.engine=fsdp2"), env, tmp_path / "p")
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "eval" not in r]
    assert len(steps) == 2 and all(0 < r["completion_len"] < 12 for r in steps)  # natural EOS, ragged
    evals = [r for r in rows if "eval" in r]
    assert len(evals) == 1 and 0 < evals[0]["eval/completion_len"] < 12  # 7 prompts over 2 processes


LOCKSTEP = r'''
import json, os, sys
import torch
from rlctl.rollouts import Prompt
from rlctl.models import Policy, load_policy
from rlctl.recipe import ModelConfig
from rlctl.train.fsdp2 import FSDP2Engine
from rlctl.models.generation import generate

engine = FSDP2Engine("cpu", "no", [], sys.argv[2])
model, tok = load_policy(ModelConfig(name=sys.argv[1]))
model = engine.prepare_model(model)
calls = []
model.register_forward_pre_hook(lambda module, args: calls.append(1))
rank = engine.process_index
torch.manual_seed(rank)
prompts = [Prompt(f"{rank + 3 * i}+{i}=") for i in range(1)]
out = generate(Policy(model, tok), prompts, 2, max_new_tokens=12, do_sample=True)
longest = int(out.completion_mask.sum(-1).max())
os.makedirs(sys.argv[2], exist_ok=True)
with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "forwards": len(calls), "longest": longest}, f)
engine.close()
'''


def test_sharded_decoding_steps_every_process_until_all_are_done(tiny_model_dir, tmp_path, env):
    """The decoding loop under FSDP2: processes whose completions end at different steps run the same
    number of forwards (each one a collective), as many as the slowest process needs."""
    import subprocess

    model = _eager_eos_model(tiny_model_dir, tmp_path / "eager")
    script = tmp_path / "lockstep.py"
    script.write_text(LOCKSTEP)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    seen = []
    for attempt in range(4):  # until the two processes' own needs differ (sampling is random)
        result = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), str(script),
                                 str(model), str(tmp_path / f"run{attempt}")], env={**env, "PYTHONHASHSEED": str(attempt)},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        rows = [json.loads((tmp_path / f"run{attempt}" / f"rank{r}.json").read_text()) for r in range(2)]
        assert len(rows) == 2
        assert rows[0]["forwards"] == rows[1]["forwards"]  # lockstep
        # one prompt forward plus one per further step of the slowest process
        assert rows[0]["forwards"] == max(r["longest"] for r in rows)
        seen.append({r["longest"] for r in rows})
        if len(seen[-1]) == 2:
            break
    assert any(len(s) == 2 for s in seen), seen  # the processes really needed different step counts
