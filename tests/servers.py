"""A real `dcpo serve` for the tests, and how a rollout through it compares with one made in
process (tests/test_serve.py, tests/test_serve_vllm.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

ROLLOUT = ["--step", "1", "--batch-size", "4", "--n", "3", "--max-new-tokens", "12",
           "--seed", "3", "--temperature", "0.8", "--top-p", "0.95", "--top-k", "40"]
# What differs between a rollout through the server and one in process, by design: which
# engine the user named, the server, and the wall-clock seconds (which differ between any
# two in-process runs too).
IDENTITY = {"generation_server", "generate_seconds", "engine_load_seconds"}


@contextlib.contextmanager
def serving(model: Path, folder: Path, *flags: str, env: dict | None = None):
    """A real `dcpo serve` on a free loopback port; yields (url, process); stops it with
    SIGTERM (as the example scripts do) and checks it removed its URL file."""
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
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        log.close()
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
