"""The trainer's side of the rollout server (``server.py``): the same interface as ``LocalEngine``.

``ServerEngine(url)`` talks to a server someone started; ``ServerEngine.launch(...)`` starts one as a
child process on the loopback address and stops it with the run. A request that cannot reach the server
is retried with backoff (``retries`` times); a server this process launched that has died is started
again, and the weights it had are pushed again before the request is retried, so a restart never
silently returns the checkpoint's weights. When every try fails the error is one line naming the URL.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

from rlctl.errors import RlctlError, RolloutsUnavailable


class ServerUnavailable(RolloutsUnavailable):
    """The rollout server did not answer after every retry."""


class ServerEngine:
    def __init__(self, url: str, timeout: float = 600.0, retries: int = 3, backoff: float = 1.0,
                 launcher: Callable[[], tuple[subprocess.Popen, str]] | None = None):
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.launcher = launcher
        self.process: subprocess.Popen | None = None
        self.version: int | None = None  # of the weights last pushed (None: the server's own checkpoint)
        self.weights_path: Path | None = None  # a copy of the last push, kept to re-push after a restart
        self.restarts = 0
        if launcher is not None:
            self.process, self.url = launcher()

    # --------------------------------------------------------------------------- starting a server
    @classmethod
    def launch(cls, model: str, dtype: str, seed: int = 0, max_model_len: int = 0, kv_cache_gib: float = 0,
               gpu_memory_utilization: float = 0.3, enforce_eager: bool = False, startup_timeout: float = 900.0,
               **kwargs: Any) -> ServerEngine:
        args = ["--model", model, "--dtype", dtype, "--seed", str(seed), "--max-model-len", str(max_model_len),
                "--kv-cache-gib", str(kv_cache_gib), "--gpu-memory-utilization", str(gpu_memory_utilization)]
        if enforce_eager:
            args.append("--enforce-eager")
        return cls("", launcher=lambda: start_server(args, startup_timeout), **kwargs)

    # --------------------------------------------------------------------------- the interface
    def generate(self, prompts: Sequence[list[int]], n: int, temperature: float, top_p: float, top_k: int,
                 max_tokens: int, min_tokens: int, seeds: Sequence[int] | None = None) -> list[list[Any]]:
        reply = self._call("POST", "/generate", json.dumps({
            "prompts": [list(p) for p in prompts], "n": n, "temperature": temperature, "top_p": top_p,
            "top_k": top_k, "max_tokens": max_tokens, "min_tokens": min_tokens,
            "seeds": None if seeds is None else list(seeds)}).encode())
        if reply["version"] != self.version:
            raise RlctlError(f"the rollout server at {self.url} generated with weights version "
                             f"{reply['version']}, not the pushed {self.version}")
        return [[(list(ids), list(logps), finish) for ids, logps, finish in group] for group in reply["completions"]]

    def load_weights(self, path: Path, version: int) -> None:
        self._upload(path, version)
        if self.launcher is not None:
            keep = self._keep_copy(path, version)
            if self.weights_path is not None:
                self.weights_path.unlink(missing_ok=True)
            self.weights_path = keep
        self.version = version

    def sequence_logprobs(self, sequences: Sequence[list[int]]) -> list[list[float]]:
        return self._call("POST", "/logprobs", json.dumps({"sequences": [list(s) for s in sequences]}).encode())[
            "logprobs"]

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health", None)

    def close(self) -> None:
        if self.process is not None:
            stop_server(self.process)
            self.process = None
        if self.weights_path is not None:
            self.weights_path.unlink(missing_ok=True)
            self.weights_path = None

    # --------------------------------------------------------------------------- transport
    def _keep_copy(self, path: Path, version: int) -> Path:
        """The last push, kept to push again to a restarted server (only a launched one can restart).

        A hard link: no copy of the bytes, and the caller may remove its own name for the file.
        """
        keep = path.with_name(f"rlctl-server-weights-{os.getpid()}-{version}.safetensors")
        keep.unlink(missing_ok=True)
        os.link(path, keep)
        return keep

    def _upload(self, path: Path, version: int) -> None:
        size = path.stat().st_size

        def send(conn: http.client.HTTPConnection) -> None:
            with open(path, "rb") as f:
                conn.request("POST", f"/weights?version={version}", body=f,
                             headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
        self._call("POST", f"/weights?version={version}", None, send=send)

    def _call(self, method: str, path: str, body: bytes | None,
              send: Callable[[http.client.HTTPConnection], None] | None = None) -> dict[str, Any]:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
                if self._restart_if_dead():
                    last = None
            try:
                return self._once(method, path, body, send)
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, closed early
                last = e
        raise ServerUnavailable(f"the rollout server at {self.url} did not answer {method} {path} after "
                                f"{self.retries + 1} tries: {last}")

    def _once(self, method: str, path: str, body: bytes | None,
              send: Callable[[http.client.HTTPConnection], None] | None) -> dict[str, Any]:
        where = urlparse(self.url)
        conn = http.client.HTTPConnection(where.hostname, where.port or 80, timeout=self.timeout)
        try:
            if send is not None:
                send(conn)
            else:
                conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = json.loads(response.read() or b"{}")
        finally:
            conn.close()
        if response.status != 200:
            raise RlctlError(f"the rollout server at {self.url} refused {method} {path}: "
                             f"{payload.get('error', response.status)}")
        return payload

    def _restart_if_dead(self) -> bool:
        if self.launcher is None or self.process is None or self.process.poll() is None:
            return False
        print(f"warning: the rollout server (pid {self.process.pid}) exited with code "
              f"{self.process.returncode}; starting it again", file=sys.stderr, flush=True)
        stop_server(self.process)  # its engine processes may have outlived it
        self.process, self.url = self.launcher()
        self.restarts += 1
        if self.weights_path is not None and self.version is not None:
            self._upload(self.weights_path, self.version)  # the new server starts from the checkpoint
        return True


def start_server(args: list[str], startup_timeout: float) -> tuple[subprocess.Popen, str]:
    """Start ``server.py`` on a free loopback port; wait until its engine is up. Its output goes to a log."""
    work = Path(tempfile.mkdtemp(prefix="rlctl-server-"))
    port_file, log = work / "port", work / "server.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "rlctl_plugins.vllm_sampler.server", "--host", "127.0.0.1", "--port", "0",
             "--port-file", str(port_file), *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    atexit.register(stop_server, process)
    deadline = time.monotonic() + startup_timeout
    while not port_file.exists():
        if process.poll() is not None:
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise RlctlError(f"the rollout server exited with code {process.returncode} while starting "
                             f"(log: {log}): {tail}")
        if time.monotonic() > deadline:
            stop_server(process)
            raise RlctlError(f"the rollout server did not start within {startup_timeout:.0f} s (log: {log})")
        time.sleep(0.2)
    return process, f"http://127.0.0.1:{int(port_file.read_text())}"


def stop_server(process: subprocess.Popen) -> None:
    """Stop the server and everything it started: vLLM's engine core and workers are its children, in
    its process group (``start_new_session``), and outlive a server that is killed alone."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group is gone already
        pass
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group (an engine core, workers)
    except ProcessLookupError:
        pass
    if process.poll() is None:
        process.wait()
