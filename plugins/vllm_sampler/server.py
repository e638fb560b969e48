"""The rollout server: a vLLM engine in its own process, serving rlctl over HTTP.

    python -m rlctl_plugins.vllm_sampler.server --model DIR [--host 127.0.0.1] [--port 8011]

Started by the ``vllm`` sampler itself (``server = "auto"``) or by hand on any machine (``server =
"http://host:port"``). Endpoints (JSON unless said):

``GET  /health``            ``{"status": "ok", "version": V, "model": ...}`` once the engine is up
``POST /generate``          ``{"prompts": [[ids]], "n", "temperature", "top_p", "top_k", "max_tokens",
                            "min_tokens", "seeds"}`` -> ``{"version": V, "completions": [[[ids, logps,
                            finish]]]}``: every rollout carries the weights version that produced it
``POST /weights?version=V`` body: a safetensors file of the policy's parameters -> ``{"version": V}``
``POST /logprobs``          ``{"sequences": [[ids]]}`` -> ``{"version": V, "logprobs": [[...]]}``

Requests are served one at a time (the engine is not re-entrant); a weights upload is written to tmpfs
and loaded with the same worker extension as a colocated engine. With ``--port 0`` the port is chosen by
the system and written to ``--port-file`` once the engine is ready.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from rlctl_plugins.vllm_sampler.weights import shared_memory_dir

CHUNK = 1 << 20


class Handler(BaseHTTPRequestHandler):
    engine: Any = None  # the LocalEngine, set by serve()
    model = ""
    lock = threading.Lock()

    def log_message(self, format: str, *args: Any) -> None:  # one line per request is noise at RL rates
        pass

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self) -> dict[str, Any]:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

    def do_GET(self) -> None:
        if urlparse(self.path).path == "/health":
            self._reply(200, {"status": "ok", "version": self.engine.version, "model": self.model})
        else:
            self._reply(404, {"error": f"no such endpoint: {self.path}"})

    def do_POST(self) -> None:
        url = urlparse(self.path)
        try:
            if url.path == "/generate":
                req = self._json()
                with self.lock:
                    groups = self.engine.generate(
                        req["prompts"], n=int(req["n"]), temperature=float(req["temperature"]),
                        top_p=float(req.get("top_p", 1.0)), top_k=int(req.get("top_k", 0)),
                        max_tokens=int(req["max_tokens"]), min_tokens=int(req.get("min_tokens", 0)),
                        seeds=req.get("seeds"))
                    version = self.engine.version
                self._reply(200, {"version": version, "completions": groups})
            elif url.path == "/weights":
                version = int(parse_qs(url.query)["version"][0])
                with self.lock:
                    self._load_upload(version)
                self._reply(200, {"version": version})
            elif url.path == "/logprobs":
                req = self._json()
                with self.lock:
                    logps = self.engine.sequence_logprobs(req["sequences"])
                self._reply(200, {"version": self.engine.version, "logprobs": logps})
            else:
                self._reply(404, {"error": f"no such endpoint: {url.path}"})
        except (KeyError, ValueError, TypeError) as e:
            self._reply(400, {"error": f"bad request to {url.path}: {e!r}"})

    def _load_upload(self, version: int) -> None:
        remaining = int(self.headers["Content-Length"])
        fd, name = tempfile.mkstemp(prefix="rlctl-upload-", suffix=".safetensors", dir=shared_memory_dir())
        try:
            with os.fdopen(fd, "wb") as f:
                while remaining:
                    chunk = self.rfile.read(min(CHUNK, remaining))
                    if not chunk:
                        raise ValueError("the weights upload ended early")
                    f.write(chunk)
                    remaining -= len(chunk)
            self.engine.load_weights(Path(name), version)
        finally:
            Path(name).unlink(missing_ok=True)


def serve(args: argparse.Namespace) -> None:
    from rlctl_plugins.vllm_sampler.engine import LocalEngine

    Handler.engine = LocalEngine(args.model, args.dtype, seed=args.seed, max_model_len=args.max_model_len,
                                 gpu_memory_utilization=args.gpu_memory_utilization,
                                 kv_cache_gib=args.kv_cache_gib, enforce_eager=args.enforce_eager)
    Handler.model = args.model
    httpd = ThreadingHTTPServer((args.host, args.port), Handler)
    port = httpd.server_address[1]
    if args.port_file:  # written last: its existence means "ready"
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)
    print(f"rlctl rollout server: {args.model} on http://{args.host}:{port}", flush=True)
    # SIGTERM (how the sampler stops a server it started) ends serve_forever like Ctrl-C, so the engine
    # shuts its own processes down below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        httpd.serve_forever()
    finally:
        Handler.engine.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m rlctl_plugins.vllm_sampler.server",
                                description="Serve rollouts from a vLLM engine to rlctl's vllm sampler.")
    p.add_argument("--model", required=True, help="model directory (or hub name) vLLM loads")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8011, help="0: any free port (see --port-file)")
    p.add_argument("--port-file", default="", help="write the port here once the engine is ready")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=0)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-gib", type=float, default=0, help="CPU engines: KV cache size (0: vLLM's)")
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args(argv)
    from rlctl.errors import RlctlError

    try:
        serve(args)
    except RlctlError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
