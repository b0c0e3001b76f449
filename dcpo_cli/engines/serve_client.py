"""`--engine server`: generation by a running `dcpo serve` (dcpo_cli/serve), over HTTP.

The client encodes prompts with `--model`'s own tokenizer (as the in-process engines do),
checks that the server's vocabulary is that tokenizer's, asks the server to load `--model`
in place when it serves other weights, and sends every generate request with the
fingerprint of the weights it wants: the server refuses it when it serves others, and
answers with the fingerprint it generated with (read under its engine lock at the end of
the request). So no response generated with other weights reaches a rollouts file, even
with other clients switching the server's weights in between.

A dropped connection (refused, reset, closed before the reply ended) is retried
`RETRIES - 1` more times, after short waits: every request is idempotent (a load of the
weights already served does nothing; a generate request is seeded, so its retry gives the
same tokens). A generate refused for "other weights" (409, or that code in the stream:
another client switched them) loads this client's weights again and asks again. Anything
else (a refusal by HTTP status, a malformed reply) ends the command with one line.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dcpo_cli.engines import protocol
from dcpo_cli.engines.base import (
    Completion,
    ProgressCallback,
    SamplingSettings,
    eos_token_ids,
    generation_config,
)
from dcpo_cli.engines.settings import ServerAddress
from dcpo_cli.errors import DcpoError
from dcpo_cli.files.model_source import ModelSource, model_identity

RETRIES = 4  # tries per request while the connection drops
BACKOFF = (0.25, 0.5, 1.0)  # seconds before the 2nd, 3rd, 4th try
CONNECT_TIMEOUT = 30.0
# Longest silence on an open request: the server sends a line at least every few seconds
# (progress or heartbeat) while it waits for its engine or generates.
READ_TIMEOUT = 300.0


class Dropped(Exception):
    """The connection went away before the reply was complete (worth another try)."""


class Refused(Exception):
    """The server answered with an error status (not worth another try)."""

    def __init__(self, status: int, message: str, code: str | None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _error_reply(status: int, body: bytes) -> Refused:
    try:
        data = json.loads(body)
        message, code = str(data["error"]), data.get("code")
    except (ValueError, KeyError, TypeError):
        message, code = f"HTTP {status} {body[:200]!r}", None
    return Refused(status, message, code)


class ServerClient:
    """The HTTP exchanges with one server: retries, timeouts, and one-line errors."""

    def __init__(self, address: ServerAddress) -> None:
        from urllib.parse import urlsplit

        address.check()
        self.address = address
        parts = urlsplit(address.url)
        self.host, self.port = parts.hostname, parts.port

    @property
    def url(self) -> str:
        return self.address.base

    def exchange(self, method: str, path: str, payload: Any = None,
                 on_line: Callable[[dict], None] | None = None) -> dict:
        """One request; its reply object (for a stream, the last line). Retries drops."""
        for attempt in range(RETRIES):
            if attempt:
                time.sleep(BACKOFF[min(attempt - 1, len(BACKOFF) - 1)])
            try:
                return self._once(method, path, payload, on_line)
            except Refused as refused:
                raise self._refusal(path, refused) from None
            except TimeoutError:
                raise DcpoError(f"{self.url}: no word from the server for {READ_TIMEOUT:.0f} s "
                                f"during {path} (is it stuck? its log may say why)") from None
            except (ConnectionError, http.client.HTTPException, Dropped) as exc:
                last = exc
            except OSError as exc:  # unreachable host, bad address: no retry helps
                raise DcpoError(f"{self.url}: cannot reach the server ({exc.strerror or exc})"
                                ) from None
        if isinstance(last, ConnectionRefusedError):
            raise DcpoError(f"{self.url}: no dcpo server answers there (connection refused, "
                            f"{RETRIES} tries); start one with `dcpo serve --model MODEL "
                            f"--port {self.port}`") from None
        raise DcpoError(f"{self.url}: the server dropped the connection during {path} "
                        f"{RETRIES} times ({type(last).__name__}; did it die? its log says "
                        "why)") from None

    def _once(self, method: str, path: str, payload: Any,
              on_line: Callable[[dict], None] | None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.address.token:
            headers["Authorization"] = f"Bearer {self.address.token}"
        body = None if payload is None else protocol.dumps(payload)
        connection = http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_TIMEOUT)
        try:
            connection.connect()
            connection.sock.settimeout(READ_TIMEOUT)
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            if response.status != 200:
                raise _error_reply(response.status, response.read())
            if response.getheader("Content-Type", "").startswith("application/x-ndjson"):
                return self._stream(path, response, on_line)
            return self._object(path, response.read())
        finally:
            connection.close()

    def _object(self, path: str, body: bytes) -> dict:
        try:
            data = json.loads(body)
        except ValueError:
            raise DcpoError(f"{self.url}: malformed reply to {path} (not JSON: "
                            f"{body[:80]!r})") from None
        if not isinstance(data, dict):
            raise DcpoError(f"{self.url}: malformed reply to {path} (not a JSON object)")
        return data

    def _stream(self, path: str, response, on_line) -> dict:
        while True:
            line = response.readline()
            if not line.endswith(b"\n"):  # closed before the final line
                raise Dropped(path)
            data = self._object(path, line)
            if "error" in data:
                if data.get("code") == "other_weights":  # switched while this request waited
                    raise Refused(409, str(data["error"]), "other_weights")
                raise DcpoError(f"{self.url}: the server failed during {path}: "
                                f"{data['error']}")
            if "completions" in data:
                return data
            if on_line is not None:
                on_line(data)

    def _refusal(self, path: str, refused: Refused) -> Exception:
        if refused.status == 401:
            return DcpoError(f"{self.url}: the server refused the request ({refused.message}); "
                             "pass the token given to `dcpo serve --token` as --server-token "
                             "(or DCPO_SERVER_TOKEN)")
        if refused.code == "other_weights":
            return refused  # the caller loads its weights again
        if refused.status == 503:
            return DcpoError(f"{self.url}: the server is stopping ({path} refused)")
        if refused.status == 413:
            return DcpoError(f"{self.url}: {path} refused as too large: {refused.message} "
                             "(use smaller --batch-size or --n, or raise the server's limits)")
        return DcpoError(f"{self.url}: {path} refused (HTTP {refused.status}): "
                         f"{refused.message}")


def source_record(source: ModelSource) -> dict[str, Any]:
    """The model to load, as the server rebuilds it (an absolute path: its own file system)."""
    return {"spec": source.spec, "path": str(source.path.resolve()),
            "repo_id": source.repo_id, "revision": source.revision, "commit": source.commit}


class ServerEngine:
    """An `Engine` whose generation runs in a `dcpo serve` process. `name` and
    `settings_record` are the served engine's (what generated the tokens);
    `server_record` is what the outputs' metadata records about the server."""

    def __init__(self, model_path: str | Path, *, address: ServerAddress,
                 source: ModelSource | None = None) -> None:
        from transformers import AutoTokenizer

        from dcpo_cli.files.lora_adapter import is_adapter

        if is_adapter(model_path):
            raise DcpoError(f"{model_path}: a LoRA checkpoint; dcpo serve loads full weights "
                            "only (use --engine hf or vllm, or `dcpo export` it first)")
        self.client = ServerClient(address)
        self.source = source or ModelSource(str(model_path), Path(model_path))
        self.fingerprint = model_identity(self.source)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        except (OSError, ValueError) as exc:
            raise DcpoError(f"{model_path}: cannot load its tokenizer ({exc})") from None
        self.eos_ids = eos_token_ids(self.tokenizer, generation_config(model_path))
        config = json.loads((Path(model_path) / "config.json").read_text())
        self.vocab_limit = max(int(config.get("vocab_size") or 0),
                               protocol.vocabulary_size(self.tokenizer))
        identity = self.client.exchange("GET", "/health")
        self._check_identity(identity)
        if identity["fingerprint"] != self.fingerprint:
            identity = self.load()
        self.name = identity["engine"]
        self.settings_record = identity["engine_settings"]
        self.server_record = {"url": self.client.url, "fingerprint": self.fingerprint,
                              "engine": identity["engine"],
                              "dcpo_version": identity["dcpo_version"]}

    def _check_identity(self, identity: dict) -> None:
        needed = ("protocol", "engine", "engine_settings", "fingerprint", "vocabulary",
                  "dcpo_version", "model")
        missing = [key for key in needed if key not in identity]
        if missing:
            raise DcpoError(f"{self.client.url}: malformed reply to /health (no "
                            f"{missing[0]!r}; is this a dcpo server?)")
        if identity["protocol"] != protocol.PROTOCOL:
            raise DcpoError(f"{self.client.url}: the server speaks protocol "
                            f"{identity['protocol']}, this dcpo {protocol.PROTOCOL} (dcpo "
                            f"{identity['dcpo_version']} there); run the same dcpo on both")
        mine = protocol.vocabulary_fingerprint(self.tokenizer, self.eos_ids)
        if identity["vocabulary"] != mine:
            served = identity["model"].get("model") if isinstance(identity["model"], dict) \
                else identity["model"]
            raise DcpoError(f"{self.client.url}: the server's model ({served}) has another "
                            f"vocabulary than {self.source.spec} (tokens or eos ids differ), "
                            "so it cannot load these weights in place; start `dcpo serve "
                            f"--model {self.source.spec}`")

    def load(self) -> dict:
        """Ask the server to serve this engine's model (in place); its new identity."""
        identity = self.client.exchange(
            "POST", "/load-weights",
            {"model": source_record(self.source), "fingerprint": self.fingerprint})
        if identity.get("fingerprint") != self.fingerprint:
            raise DcpoError(f"{self.client.url}: asked to load {self.source.spec}, the server "
                            "reports other weights")
        self._check_identity(identity)
        return identity

    def generate(self, prompt_token_ids: list[list[int]], settings: SamplingSettings,
                 on_progress: ProgressCallback | None = None) -> list[list[Completion]]:
        payload = {"prompt_token_ids": [list(map(int, ids)) for ids in prompt_token_ids],
                   "settings": protocol.settings_to_json(settings),
                   "fingerprint": self.fingerprint}

        def on_line(line: dict) -> None:
            progress = line.get("progress")
            if on_progress and isinstance(progress, list) and len(progress) == 2:
                on_progress(int(progress[0]), int(progress[1]))

        for attempt in range(RETRIES):
            try:
                reply = self.client.exchange("POST", "/generate", payload, on_line)
                break
            except Refused as refused:  # another client switched the weights meanwhile
                if attempt == RETRIES - 1:
                    raise DcpoError(f"{self.client.url}: the server kept switching to other "
                                    f"weights ({refused.message})") from None
                self.load()
        if reply.get("fingerprint") != self.fingerprint:
            raise DcpoError(f"{self.client.url}: the server generated with other weights than "
                            f"{self.source.spec} (fingerprint {str(reply.get('fingerprint'))[:12]}"
                            f", wanted {self.fingerprint[:12]}); nothing written")
        try:
            return protocol.completions_from_json(reply["completions"], settings,
                                                  len(prompt_token_ids), self.vocab_limit)
        except protocol.ProtocolError as exc:
            raise DcpoError(f"{self.client.url}: malformed reply to /generate ({exc})") from None


def server_identity(address: ServerAddress) -> dict:
    """The server's /health reply (for `dcpo eval`, before it decides what to generate)."""
    identity = ServerClient(address).exchange("GET", "/health")
    for key in ("engine", "engine_settings"):
        if key not in identity:
            raise DcpoError(f"{address.base}: malformed reply to /health (no {key!r}; is this "
                            "a dcpo server?)")
    return identity
