"""`dcpo serve` and `--engine server`: a real `dcpo serve` process with the hf engine on a free
loopback port, against the in-process hf engine on the `--size test` tiny model.

Same seeds give the same rollouts through the server as in process (rows, and metadata but
for the engine identity: options.engine, generation_server, and the wall-clock seconds);
the server loads other checkpoints in place; concurrent shards work; a token is enforced;
and every fault (no server, a server dying mid-request, a dropped connection, another
vocabulary, a malformed reply, other weights) is one line and exit 2 with nothing written,
or, for a single dropped connection, a retry that gives the same file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import assert_one_line_error, run_dcpo
from servers import (
    ROLLOUT,
    assert_same_rollouts,
    completion,
    fake_server,
    get_json,
    groups,
    metadata,
    rollout,
    serving,
    via,
)

from dcpo_cli.files.model_source import model_identity


@pytest.fixture(scope="module")
def other_vocabulary(tiny, tmp_path_factory) -> Path:
    """The tiny model with two tokens' ids swapped in its tokenizer."""
    folder = tmp_path_factory.mktemp("vocab") / "model"
    shutil.copytree(tiny / "model", folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    with serving(tiny / "model", tmp_path_factory.mktemp("server")) as (url, process):
        yield url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_identity_names_the_served_model(server, tiny):
    status, identity = get_json(server, "/health")
    assert status == 200
    assert identity["engine"] == "hf" and identity["protocol"] == 1
    assert identity["model"]["path"] == str((tiny / "model").resolve())
    assert identity["model"]["model_id"] is None and identity["model"]["revision"] is None
    assert identity["fingerprint"] == model_identity(tiny / "model")
    assert identity["engine_settings"]["dtype"] == "auto"
    assert get_json(server, "/nothing")[0] == 404
    assert get_json(server, "/generate", body={"prompt_token_ids": "x"})[0] == 400


@pytest.mark.slow
def test_rollouts_through_the_server_are_the_in_process_ones(server, tiny, in_process,
                                                             tmp_path):
    out = tmp_path / "served.parquet"
    result = rollout(tiny / "model", tiny, out, *via(server))
    assert result.code == 0, result.stderr
    assert_same_rollouts(out, in_process(tiny / "model"), server)


@pytest.mark.slow
def test_eval_through_the_server_is_the_in_process_eval(server, tiny, tmp_path):
    args = ["eval", "--model", tiny / "model", "--benchmark", tiny / "test.parquet",
            "--limit", "3", "--avg-at", "2", "--max-new-tokens", "10"]
    assert run_dcpo(*args, "--engine", "hf", "--out", tmp_path / "local").code == 0
    result = run_dcpo(*args, *via(server), "--out", tmp_path / "served")
    assert result.code == 0, result.stderr
    ours = pq.read_table(tmp_path / "served" / "test" / "samples.parquet")
    assert ours.equals(pq.read_table(tmp_path / "local" / "test" / "samples.parquet"))
    meta = metadata(tmp_path / "served" / "test" / "samples.parquet")["dcpo"]
    assert meta["options"]["engine_kind"] == "hf"  # the engine that generated
    assert meta["generation_server"]["fingerprint"] == meta["model_fingerprint"]
    # so an in-process eval of the same model reuses the served samples
    again = run_dcpo(*args, "--engine", "hf", "--out", tmp_path / "served")
    assert again.code == 0, again.stderr
    assert pq.read_table(tmp_path / "served" / "test" / "samples.parquet").equals(ours)
    assert metadata(tmp_path / "served" / "test" / "samples.parquet")["dcpo"] == meta
    # (it needed no engine: reused benchmarks load none)
    assert "reused" in again.stdout or again.stdout


@pytest.mark.slow
def test_load_weights_switches_checkpoints_in_place(tiny, other_weights, in_process, tmp_path):
    with serving(tiny / "model", tmp_path) as (url, _):
        result = rollout(other_weights, tiny, tmp_path / "other.parquet", *via(url))
        assert result.code == 0, result.stderr
        identity = get_json(url, "/health")[1]
        assert identity["fingerprint"] == model_identity(other_weights)
        assert identity["weight_loads"] == 1
        assert_same_rollouts(tmp_path / "other.parquet", in_process(other_weights), url)
        assert not pq.read_table(tmp_path / "other.parquet").equals(
            pq.read_table(in_process(tiny / "model")))
        # and back: the base model's tokens again
        result = rollout(tiny / "model", tiny, tmp_path / "back.parquet", *via(url))
        assert result.code == 0, result.stderr
        assert_same_rollouts(tmp_path / "back.parquet", in_process(tiny / "model"), url)
        assert get_json(url, "/health")[1]["weight_loads"] == 2


@pytest.mark.slow
def test_concurrent_shards_against_one_server(server, tiny, in_process, tmp_path):
    processes = [subprocess.Popen(
        [sys.executable, "-m", "dcpo_cli", "rollout", "--model", str(tiny / "model"),
         "--prompts", str(tiny / "train.parquet"), *ROLLOUT, *via(server), "--shard",
         f"{i}/3", "--out", str(tmp_path / f"shard-{i}.parquet")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr
    for i in range(3):
        assert_same_rollouts(tmp_path / f"shard-{i}.parquet", in_process(tiny / "model",
                                                                         f"{i}/3"), server)


@pytest.mark.slow
def test_a_token_is_required_on_every_request(tiny, in_process, tmp_path):
    with serving(tiny / "model", tmp_path, env={"DCPO_SERVER_TOKEN": "s3cret"}) as (url, _):
        assert get_json(url, "/health")[0] == 401
        assert get_json(url, "/health", token="wrong")[0] == 401
        assert get_json(url, "/generate", token="wrong", body={})[0] == 401
        assert get_json(url, "/health", token="s3cret")[0] == 200
        out = tmp_path / "rollouts.parquet"
        result = rollout(tiny / "model", tiny, out, *via(url))
        assert_one_line_error(result, url, "--server-token")
        assert not out.exists()
        result = rollout(tiny / "model", tiny, out, *via(url), "--server-token", "wrong")
        assert_one_line_error(result, "refused")
        result = rollout(tiny / "model", tiny, out, *via(url),
                         env={"DCPO_SERVER_TOKEN": "s3cret"})
        assert result.code == 0, result.stderr
        assert_same_rollouts(out, in_process(tiny / "model"), url)


@pytest.mark.slow
def test_no_server_is_one_line(tiny, tmp_path):
    out = tmp_path / "rollouts.parquet"
    url = f"http://127.0.0.1:{free_port()}"
    assert_one_line_error(rollout(tiny / "model", tiny, out, *via(url)), url,
                          "no dcpo server answers", "dcpo serve")
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--engine", "server"], "--server-url"),
    (["--engine", "hf", "--server-url", "http://127.0.0.1:9"], "--engine server"),
    (["--engine", "server", "--server-url", "127.0.0.1:9"], "http://HOST:PORT"),
    (["--engine", "server", "--server-url", "http://127.0.0.1:9", "--dtype", "float16"],
     "dcpo serve"),
])
def test_bad_server_flags_are_one_line(tiny, tmp_path, flags, message):
    out = tmp_path / "rollouts.parquet"
    assert_one_line_error(rollout(tiny / "model", tiny, out, *flags), message)
    assert not out.exists()


def test_dcpo_run_with_the_server_engine_needs_its_address(tmp_path):
    assert_one_line_error(run_dcpo("run", tmp_path / "run", "--steps", "1", "--engine",
                                   "server"), "--engine server needs --server-url")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_another_vocabulary_is_refused(server, tiny, other_vocabulary, tmp_path):
    out = tmp_path / "rollouts.parquet"
    assert_one_line_error(rollout(other_vocabulary, tiny, out, *via(server)),
                          "another vocabulary")
    assert not out.exists()
    # the server refuses it too, whatever a client says
    status, reply = get_json(server, "/load-weights", body={
        "model": {"spec": "x", "path": str(other_vocabulary)},
        "fingerprint": model_identity(other_vocabulary)})
    assert (status, reply["code"]) == (409, "other_vocabulary"), reply
    assert get_json(server, "/health")[1]["fingerprint"] == model_identity(tiny / "model")


class Proxy:
    """A loopback TCP proxy in front of a server that mistreats POST /generate: `drops`
    connections closed before they reach the server, or `kill` the server process as its
    reply starts (a server dying mid-request)."""

    def __init__(self, upstream: str, drops: int = 0, kill=None) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.drops, self.kill = drops, kill
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.generates = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            head = client.recv(65536)
            generate = head.startswith(b"POST /generate")
            if generate:
                self.generates += 1
                if self.generates <= self.drops:
                    client.shutdown(socket.SHUT_RDWR)
                    return
            try:
                upstream = socket.create_connection(self.upstream)
            except OSError:
                return
            with upstream:
                upstream.sendall(head)
                threading.Thread(target=self._pipe, args=(client, upstream),
                                 daemon=True).start()
                first = True
                while data := upstream.recv(65536):
                    if generate and first and self.kill is not None:
                        self.kill()
                        break
                    first = False
                    client.sendall(data)
            # shutdown, not just close: the other direction's thread still reads this socket
            client.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.slow
def test_a_dropped_connection_is_retried(server, tiny, in_process, tmp_path):
    proxy = Proxy(server, drops=2)
    try:
        out = tmp_path / "rollouts.parquet"
        result = rollout(tiny / "model", tiny, out, *via(proxy.url))
        assert result.code == 0, result.stderr
        assert proxy.generates == 3
        assert pq.read_table(out).equals(pq.read_table(in_process(tiny / "model")))
    finally:
        proxy.close()


@pytest.mark.slow
def test_a_server_dying_mid_request_is_one_line(tiny, tmp_path):
    with serving(tiny / "model", tmp_path) as (url, process):
        proxy = Proxy(url, kill=lambda: (process.kill(), process.wait()))
        try:
            out = tmp_path / "rollouts.parquet"
            result = rollout(tiny / "model", tiny, out, *via(proxy.url))
            assert_one_line_error(result, "dropped the connection during /generate")
            assert not out.exists()
            assert process.poll() is not None
        finally:
            proxy.close()
        os.unlink(next(tmp_path.glob("server-*.url")))  # a killed server leaves it behind


@pytest.fixture(scope="module")
def identity(server) -> dict:
    return get_json(server, "/health")[1]


MALFORMED = {
    "not JSON": lambda request: b"{completions: oops\n",
    "a group short": lambda request: json.dumps({
        "completions": [g[:-1] for g in groups(request, lambda i: completion([5, 6]))],
        "fingerprint": request["fingerprint"]}).encode() + b"\n",
    "a token outside the vocabulary": lambda request: json.dumps({
        "completions": groups(request, lambda i: completion([5, 10 ** 6])),
        "fingerprint": request["fingerprint"]}).encode() + b"\n",
    "other weights": lambda request: json.dumps({
        "completions": groups(request, lambda i: completion([5, 6])),
        "fingerprint": "0" * 64}).encode() + b"\n",
    "an engine failure": lambda request: b'{"error": "out of memory"}\n',
}
MESSAGES = {"not JSON": "malformed reply to /generate", "a group short": "expected 3 per prompt",
            "a token outside the vocabulary": "token ids in [0,",
            "other weights": "other weights", "an engine failure": "out of memory"}


@pytest.mark.parametrize("fault", list(MALFORMED))
@pytest.mark.slow
def test_a_malformed_reply_is_one_line_and_writes_nothing(identity, tiny, tmp_path, fault):
    fake = fake_server(identity, MALFORMED[fault])
    try:
        url = f"http://127.0.0.1:{fake.server_address[1]}"
        out = tmp_path / "rollouts.parquet"
        assert_one_line_error(rollout(tiny / "model", tiny, out, *via(url)), url,
                              MESSAGES[fault])
        assert not out.exists()
    finally:
        fake.shutdown()
        fake.server_close()


@pytest.mark.slow
def test_a_health_reply_from_something_else_is_one_line(tiny, tmp_path):
    fake = fake_server({"hello": "world"}, lambda request: b"")
    try:
        url = f"http://127.0.0.1:{fake.server_address[1]}"
        assert_one_line_error(rollout(tiny / "model", tiny, tmp_path / "r.parquet",
                                      *via(url)), "is this a dcpo server?")
    finally:
        fake.shutdown()
        fake.server_close()
