"""The rollout server's protocol and the client's failure handling, without vLLM (real vLLM behind the
same server: ``tests/test_vllm_real.py``), and ``rlctl check-parity``."""

from __future__ import annotations

import socket
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rlctl.cli import cli
from rlctl.errors import RolloutsUnavailable
from rlctl.testing import tiny_model
from rlctl_plugins.vllm_sampler import server as server_module
from rlctl_plugins.vllm_sampler.client import ServerEngine, ServerUnavailable
from rlctl_plugins.vllm_sampler.weights import weights_file


class RecordingEngine:
    """What the server serves: records calls, answers like ``LocalEngine``."""

    def __init__(self):
        self.version = None
        self.loaded: list[dict[str, torch.Tensor]] = []
        self.calls: list[dict] = []

    def generate(self, prompts, n, temperature, top_p, top_k, max_tokens, min_tokens, seeds=None):
        self.calls.append({"prompts": prompts, "n": n, "max_tokens": max_tokens, "seeds": seeds})
        return [[(p[:max_tokens], [-0.5] * min(len(p), max_tokens), "length") for _ in range(n)] for p in prompts]

    def load_weights(self, path: Path, version: int):
        from safetensors.torch import load_file

        self.loaded.append(load_file(str(path)))
        self.version = version

    def sequence_logprobs(self, sequences):
        return [[-1.0] * (len(s) - 1) for s in sequences]


@pytest.fixture
def served():
    engine = RecordingEngine()
    server_module.Handler.engine, server_module.Handler.model = engine, "stand-in"
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), server_module.Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield engine, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_generate_weights_and_versions_over_http(served):
    engine, url = served
    client = ServerEngine(url, retries=0)
    assert client.health() == {"status": "ok", "version": None, "model": "stand-in"}
    groups = client.generate([[5, 6, 7]], n=2, temperature=1.0, top_p=1.0, top_k=0, max_tokens=2, min_tokens=0,
                             seeds=[11])
    assert groups == [[([5, 6], [-0.5, -0.5], "length")] * 2]
    assert engine.calls[-1]["seeds"] == [11]
    model = torch.nn.Linear(3, 2)
    with weights_file(model) as path:
        client.load_weights(path, 5)
    assert engine.version == 5 and client.version == 5
    torch.testing.assert_close(engine.loaded[-1]["weight"], model.weight.detach())  # every byte arrived
    assert client.sequence_logprobs([[1, 2, 3]]) == [[-1.0, -1.0]]


def test_a_reply_from_other_weights_is_refused(served):
    engine, url = served
    client = ServerEngine(url, retries=0)
    engine.version = 3  # e.g. a server restarted by someone else, or shared with another run
    with pytest.raises(Exception, match="generated with weights version 3, not the pushed None"):
        client.generate([[1]], n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=1, min_tokens=0)


def test_a_bad_request_is_a_400_with_the_reason(served):
    _, url = served
    client = ServerEngine(url, retries=0)
    with pytest.raises(Exception, match="refused POST /generate: bad request"):
        client._call("POST", "/generate", b'{"prompts": []}')


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_is_down_is_retried_then_one_line():
    client = ServerEngine(f"http://127.0.0.1:{closed_port()}", retries=2, backoff=0.01)
    with pytest.raises(ServerUnavailable, match=r"did not answer GET /health after 3 tries") as err:
        client.health()
    assert "\n" not in str(err.value) and isinstance(err.value, RolloutsUnavailable)


def test_a_run_whose_server_is_down_stops_with_a_checkpoint_and_resumes(tmp_path):
    """Nothing is lost: the step that could not sample is taken again on resume, from the same prompts.

    The run starts with its server down, stops at step 0 with a checkpoint, and is resumed with the
    ``hf`` sampler (as if the server were back): its steps equal those of a run that never failed.
    """
    model = tiny_model(tmp_path / "m", hidden_size=32, num_layers=2, num_heads=2)
    common = ["--set", f"model.name={model}", "--set", "train.steps=2", "--set", "sampler.max_new_tokens=4",
              "--set", "train.prompts_per_step=2", "--set", "train.group_size=2", "-q"]
    down = ["--set", 'sampler.use="vllm"', "--set", f'sampler.server="http://127.0.0.1:{closed_port()}"',
            "--set", "sampler.retries=0"]
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["run", "recipes/grpo.toml", "--output-dir", str(out), *common, *down])
    assert result.exit_code == 2, result.output
    message = result.output.strip().splitlines()[-1]
    assert "did not answer" in message and "checkpoint written to" in message and "--resume latest" in message
    assert [p.name for p in (out / "checkpoints").iterdir() if p.is_dir()] == ["step-000000"]

    resumed = CliRunner().invoke(cli, ["run", "recipes/grpo.toml", "--output-dir", str(out), "--resume", "latest",
                                       *common])
    assert resumed.exit_code == 0, resumed.output
    whole = tmp_path / "whole"
    assert CliRunner().invoke(cli, ["run", "recipes/grpo.toml", "--output-dir", str(whole), *common]).exit_code == 0
    from rlctl.metrics import read_metrics

    keys = ("step", "reward", "loss", "completion_len")
    def steps(run):
        return [{k: r[k] for k in keys} for r in read_metrics(run / "metrics.jsonl") if "eval" not in r]
    assert len(steps(whole)) == 2 and steps(out) == steps(whole)


def test_check_parity_reports_and_judges(tmp_path):
    model = tiny_model(tmp_path / "m", hidden_size=32, num_layers=4, num_heads=2)
    args = ["check-parity", "recipes/nested_reft.toml", "--steps", "2", "--set", f"model.name={model}",
            "--set", "sampler.max_new_tokens=4", "--set", "train.prompts_per_step=2"]
    ok = CliRunner().invoke(cli, [*args, "--tolerance", "100"])
    assert ok.exit_code == 0, ok.output
    assert "max |gap|" in ok.output and "ok: the largest per-token gap is" in ok.output
    bad = CliRunner().invoke(cli, [*args, "--tolerance", "1e-12"])
    # the recipe's second stage (the nested sampler's) starts at step 2
    assert bad.exit_code == 2 and "> tolerance 1e-12 at step 2: after an update" in bad.output


def test_check_parity_with_a_sampler_that_records_nothing(tmp_path):
    model = tiny_model(tmp_path / "m", hidden_size=32, num_layers=2, num_heads=2)
    result = CliRunner().invoke(cli, ["check-parity", "recipes/grpo.toml", "--steps", "1", "--set",
                                      f"model.name={model}", "--set", "train.prompts_per_step=2"])
    assert result.exit_code == 2 and "no step had sampler log-probs" in result.output
