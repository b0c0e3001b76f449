"""A real `dcpo serve` for the tests, and how a rollout through it compares with one made in
process (tests/test_serve.py, tests/test_serve_vllm.py)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.parquet as pq
from conftest import Result, run_dcpo

ROLLOUT = ["--step", "1", "--batch-size", "4", "--n", "3", "--max-new-tokens", "12",
           "--seed", "3", "--temperature", "0.8", "--top-p", "0.95", "--top-k", "40"]
# What differs between a rollout through the server and one in process, by design: which
# engine the user named, the server, and the wall-clock seconds (which differ between any
# two in-process runs too).
IDENTITY = {"generation_server", "generate_seconds", "engine_load_seconds"}


@contextlib.contextmanager
def serving(model: Path, folder: Path, *flags: str, env: dict | None = None):
    """A real `dcpo serve` on a free loopback port; yields (url, process); stops it with
    SIGTERM (as the example scripts do) and checks it exited 0 and removed its URL file."""
    url_file = folder / f"server-{time.monotonic_ns()}.url"
    log = open(folder / f"{url_file.stem}.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [sys.executable, "-m", "dcpo_cli", "serve", "--model", str(model), "--engine", "hf",
         "--port", "0", "--url-file", str(url_file), *flags],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200",
                                                   **(env or {})})
    try:
        deadline = time.monotonic() + 300  # a start-up bound, not a timing assertion
        while not url_file.is_file():
            assert process.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, "dcpo serve did not start"
            time.sleep(0.1)
        yield url_file.read_text().strip(), process
    finally:
        stopped = process.poll() is None
        if stopped:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
        log.close()
    if stopped:  # SIGTERM: a clean stop (issue 34: it once aborted, exit 134)
        assert process.returncode == 0, Path(log.name).read_text()
        assert "terminate called" not in Path(log.name).read_text()
    assert not url_file.exists()


def via(url: str) -> list[str]:
    return ["--engine", "server", "--server-url", url]


def metadata(path: Path) -> dict:
    raw = pq.read_schema(path).metadata
    return {k.decode(): json.loads(v) for k, v in raw.items() if not k.startswith(b"ARROW")}


def assert_same_rollouts(served: Path, local: Path, url: str) -> None:
    """Equal rows, and equal metadata apart from the engine identity and the seconds."""
    assert pq.read_table(served).equals(pq.read_table(local))
    ours, theirs = metadata(served)["dcpo"], metadata(local)["dcpo"]
    assert ours["options"].pop("engine") == "server"
    assert theirs["options"].pop("engine") == theirs["engine"]
    assert ours["generation_server"]["url"] == url
    assert ours["generation_server"]["fingerprint"] == ours["model_fingerprint"]
    assert ours["generation_server"]["engine"] == ours["engine"] == theirs["engine"]
    assert theirs["generation_server"] is None
    for key in IDENTITY:
        ours.pop(key), theirs.pop(key)
    assert ours == theirs


def get_json(url: str, path: str, token: str | None = None, body: dict | None = None):
    request = urllib.request.Request(url + path, data=None if body is None else
                                     json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {token}"} if token
                                     else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# What makes the real vLLM engine start fast on a CPU (tests/test_vllm_real.py,
# tests/test_serve_vllm.py): no torch.compile / graph capture, and a small fixed KV cache
# (vLLM then skips its memory-profiling warm-up).
KV_CACHE_BYTES = 64 << 20
VLLM_CPU_FLAGS = ["--enforce-eager", "--dtype", "float32",
                  "--engine-arg", f"kv_cache_memory_bytes={KV_CACHE_BYTES}"]


def rollout(model: Path, tiny: Path, out: Path, *flags: str, env: dict | None = None):
    args = ["rollout", "--model", model, "--prompts", tiny / "train.parquet", *ROLLOUT,
            "--out", out, *flags]
    if env is None:
        return run_dcpo(*args)
    process = subprocess.run([sys.executable, "-m", "dcpo_cli", *map(str, args)],
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "COLUMNS": "200", **env})
    return Result(process.returncode, process.stdout, process.stderr)


def fake_server(identity: dict, reply):
    """A server that answers /health like the real one and POSTs with `reply(request)`
    (bytes: the body of the stream; or (bytes, status): a status other than 200, or the
    JSON reply to /load-weights)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, body: bytes, kind: str, status: int = 200) -> None:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._send(json.dumps(identity).encode(), "application/json")

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body, status = (lambda r: r if isinstance(r, tuple) else (r, 200))(reply(request))
            streamed = self.path == "/generate" and status == 200
            self._send(body, "application/x-ndjson" if streamed else "application/json",
                       status)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def completion(ids: list[int]) -> dict:
    return {"token_ids": ids, "logprobs": [-0.5] * len(ids), "text": "x",
            "finish_reason": "length"}


def groups(request: dict, make) -> list:
    n = request["settings"]["n"]
    return [[make(i) for i in range(n)] for _ in request["prompt_token_ids"]]

# log-probs of the same tokens from two code paths (sampler vs teacher-forced), in nats
LOGPROB_TOLERANCE = 1e-4


def post(url: str, path: str, body, raw: bytes | None = None) -> tuple[int, dict | list]:
    """A POST and its reply: (status, the JSON object, or for a stream its lines)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        connection.request("POST", path, body=raw if raw is not None else
                           json.dumps(body).encode(), headers={"Content-Type":
                                                               "application/json"})
        response = connection.getresponse()
        data = response.read()
        if response.getheader("Content-Type", "").startswith("application/x-ndjson"):
            return response.status, [json.loads(line) for line in data.splitlines()]
        return response.status, json.loads(data)
    finally:
        connection.close()


def model_like(tiny: Path, folder: Path, tensors: dict | None) -> Path:
    """A model directory with the tiny model's config and tokenizer and `tensors` as its
    weights (None: no weights file written)."""
    folder.mkdir(parents=True)
    for file in (tiny / "model").iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copy(file, folder / file.name)
    if tensors is not None:
        from safetensors.torch import save_file

        save_file(tensors, folder / "model.safetensors")
    return folder


def tiny_tensors(tiny: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(tiny / "model" / "model.safetensors")


def broken_models(tiny: Path, root: Path) -> dict[str, Path]:
    import torch

    weights = tiny_tensors(tiny)
    embed = "model.embed_tokens.weight"
    models = {
        "one zeroed tensor, the rest missing": model_like(
            tiny, root / "zeroed", {embed: torch.zeros_like(weights[embed])}),
        "a tensor of another shape": model_like(
            tiny, root / "shape", {**weights, embed: torch.zeros(3, 7)}),
        "integer weights": model_like(
            tiny, root / "dtype", {**weights, embed: weights[embed].to(torch.int32)}),
        "an unexpected tensor": model_like(
            tiny, root / "extra", {**weights, "model.surprise.weight": torch.zeros(2)}),
        "no weights": model_like(tiny, root / "none", None),
    }
    folder = model_like(tiny, root / "directory", None)
    (folder / "model.safetensors").mkdir()
    models["a directory named model.safetensors"] = folder
    folder = model_like(tiny, root / "dangling", None)
    (folder / "model.safetensors").symlink_to(root / "nowhere.safetensors")
    models["a dangling link"] = folder
    folder = model_like(tiny, root / "garbage", None)
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    models["a corrupt weights file"] = folder
    return models
