"""`dcpo serve`: one generation engine (hf or vLLM) started once and kept loaded, answering
dcpo's JSON protocol (`engines/protocol.py`) over HTTP, so the stages of a shell loop
(`dcpo rollout --engine server`, `dcpo eval --engine server`) do not pay an engine's cold
start every step.

The standard library's `ThreadingHTTPServer`: each request has its own thread, and one lock
gives the engine to one request at a time (generate and load-weights alike), so concurrent
`--shard i/n` rollouts queue; a waiting or generating request gets a heartbeat line every
`HEARTBEAT` seconds, so its client can tell a busy server from a dead one. Nothing is
cached between requests: a request's tokens depend on its prompts, settings and seed alone,
as with the in-process engine.

Weights are replaced in place (`engine.load_weights`, as `dcpo run` does after each
train-step; vLLM's prefix cache is reset there) from a model directory the server reads
from its own file system. It loads only a model it can serve exactly as a fresh engine
would: the same vocabulary (tokens and eos ids) and the same config.json apart from its
dtype and version fields; anything else needs a server started on that model.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dcpo_cli import __version__
from dcpo_cli.console import err
from dcpo_cli.engines import protocol
from dcpo_cli.engines.protocol import ProtocolError
from dcpo_cli.engines.settings import EngineSettings
from dcpo_cli.errors import DcpoError, first_line
from dcpo_cli.files.model_source import ModelSource, model_identity

HEARTBEAT = 5.0  # seconds between lines on an open generate request
MAX_BODY = 1 << 30  # bytes of a request body
# config.json fields an in-place load may change: how the file was written, and use_cache
# (train-step saves it off; generation takes it from the engine's own generation config)
CONFIG_FREE = {"dtype", "torch_dtype", "transformers_version", "_name_or_path", "use_cache"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class Conflict(Exception):
    """A request the server cannot serve as asked (409). `code` tells the client why."""

    def __init__(self, message: str, code: str = "conflict") -> None:
        super().__init__(message)
        self.code = code


def comparable_config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise DcpoError(f"{model_dir}: unreadable config.json ({first_line(exc)})") from None
    return {key: value for key, value in config.items() if key not in CONFIG_FREE}


def read_weights(model_dir: Path) -> dict[str, Any]:
    """The checkpoint-named tensors of a model directory (safetensors, else .bin files)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    tensors: dict[str, Any] = {}
    for file in files:
        tensors.update(load_file(file))
    if not files:
        for file in sorted(Path(model_dir).glob("*.bin")):
            tensors.update(torch.load(file, map_location="cpu", weights_only=True))
    if not tensors:
        raise DcpoError(f"{model_dir}: no weights (*.safetensors or *.bin)")
    return tensors


@dataclass
class Served:
    source: ModelSource
    fingerprint: str


class GenerationService:
    """The engine and the model it holds, behind one lock."""

    def __init__(self, engine: Any, kind: str, settings: EngineSettings, source: ModelSource,
                 release_between: bool = False) -> None:
        self.engine, self.kind = engine, kind
        self.settings_record = settings.record()
        self.lock = threading.Lock()
        self.served = Served(source, model_identity(source))
        self.vocabulary = protocol.vocabulary_fingerprint(engine.tokenizer, engine.eos_ids)
        self.config = comparable_config(source.path)
        self.release_between = release_between
        self.loads = 0

    def identity(self) -> dict[str, Any]:
        served = self.served
        return {"dcpo_version": __version__, "protocol": protocol.PROTOCOL,
                "engine": self.kind, "engine_settings": self.settings_record,
                "model": {**served.source.record(), "path": str(served.source.path.resolve()),
                          "revision": served.source.revision},
                "fingerprint": served.fingerprint, "vocabulary": self.vocabulary,
                "weight_loads": self.loads}

    def generate(self, prompts: list[list[int]], settings, fingerprint: str, on_progress):
        with self.lock:
            if fingerprint != self.served.fingerprint:
                raise Conflict(f"it serves {self.served.source.spec} (fingerprint "
                               f"{self.served.fingerprint[:12]}), not the weights asked for "
                               f"({str(fingerprint)[:12]})", "other_weights")
            try:
                completions = self.engine.generate(prompts, settings, on_progress)
            finally:
                if self.release_between:
                    self._release()
            return completions, self.served.fingerprint

    def _release(self) -> None:
        release = getattr(self.engine, "release", None)
        if callable(release):
            release()

    def load_weights(self, record: Any, fingerprint: Any) -> dict[str, Any]:
        source = self._source(record)
        seen = model_identity(source)
        if seen != fingerprint:
            raise Conflict(f"{source.path}: the server sees other files there than the client "
                           "(fingerprints differ); the server must share the client's file "
                           "system")
        if seen == self.served.fingerprint:
            return self.identity()  # already served: a repeated or concurrent request
        self._check_compatible(source.path)
        tensors = read_weights(source.path)
        with self.lock:
            if seen != self.served.fingerprint:
                started = time.perf_counter()
                self.engine.load_weights(tensors.items())
                if self.release_between:
                    self._release()
                self.served, self.loads = Served(source, seen), self.loads + 1
                err.print(f"loaded {source.spec} in place ({time.perf_counter() - started:.1f}"
                          " s)", highlight=False)
        return self.identity()

    @staticmethod
    def _source(record: Any) -> ModelSource:
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise ProtocolError("model: expected {spec, path, repo_id, revision, commit}")
        path = Path(record["path"])
        from dcpo_cli.files.lora_adapter import is_adapter

        if is_adapter(path):
            raise Conflict(f"{path}: a LoRA checkpoint; the server loads full weights only "
                           "(`dcpo export` it first)", "other_model")
        if not path.is_dir() or not (path / "config.json").is_file():
            raise Conflict(f"{path}: not a model directory on the server (no config.json)")
        fields = {key: record.get(key) for key in ("repo_id", "revision", "commit")}
        if not all(value is None or isinstance(value, str) for value in fields.values()):
            raise ProtocolError("model: repo_id, revision and commit must be strings or null")
        return ModelSource(str(record.get("spec") or path), path, **fields)

    def _check_compatible(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        from dcpo_cli.engines.base import eos_token_ids, generation_config

        config = comparable_config(model_dir)
        changed = sorted(set(config) ^ set(self.config)
                         | {k for k in config.keys() & self.config.keys()
                            if config[k] != self.config[k]})
        if changed:
            raise Conflict(f"{model_dir}: its config.json differs from the served model's "
                           f"({changed[0]}), so it cannot be loaded in place; start "
                           f"`dcpo serve --model {model_dir}`", "other_model")
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise Conflict(f"{model_dir}: cannot load its tokenizer ({first_line(exc)})"
                           ) from None
        vocabulary = protocol.vocabulary_fingerprint(
            tokenizer, eos_token_ids(tokenizer, generation_config(model_dir)))
        if vocabulary != self.vocabulary:
            raise Conflict(f"{model_dir}: another vocabulary than the served model's (tokens "
                           "or eos ids differ); start `dcpo serve --model` on it",
                           "other_vocabulary")


class _Lines:
    """The JSON lines of one streamed reply, written by the request and its heartbeat."""

    def __init__(self, wfile) -> None:
        self.wfile, self.lock = wfile, threading.Lock()
        self.done = threading.Event()

    def write(self, value: dict) -> None:
        with self.lock:
            self.wfile.write(protocol.dumps(value) + b"\n")
            self.wfile.flush()

    def beat(self) -> None:
        while not self.done.wait(HEARTBEAT):
            try:
                self.write({"wait": True})
            except OSError:  # the client went away; the request notices on its next line
                return


def make_handler(service: GenerationService, token: str | None):
    class Handler(BaseHTTPRequestHandler):
        server_version = f"dcpo-serve/{__version__}"

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base's name)
            pass  # requests are logged by what they did, below

        def _send(self, status: int, value: dict) -> None:
            body = protocol.dumps(value)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            if token is None:
                return True
            given = self.headers.get("Authorization", "").encode()
            if hmac.compare_digest(given, f"Bearer {token}".encode()):
                return True
            self._send(401, {"error": "missing or wrong token (the server was started with "
                             "--token)"})
            return False

        def _request(self) -> dict:
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise ProtocolError("a request needs a Content-Length") from None
            if not 0 <= length <= MAX_BODY:
                raise ProtocolError(f"request body of {length} bytes (at most {MAX_BODY})")
            try:
                value = json.loads(self.rfile.read(length))
            except ValueError:
                raise ProtocolError("the request body is not JSON") from None
            if not isinstance(value, dict):
                raise ProtocolError("the request body must be a JSON object")
            return value

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path == "/health":
                self._send(200, service.identity())
            else:
                self._send(404, {"error": f"no endpoint {self.path} (GET /health)"})

        def do_POST(self) -> None:
            if not self._authorized():
                return
            if self.path not in ("/generate", "/load-weights"):
                self._send(404, {"error": f"no endpoint {self.path} (POST /generate, "
                                 "/load-weights)"})
                return
            try:
                request = self._request()
                if self.path == "/generate":
                    self._generate(request)
                else:
                    self._send(200, service.load_weights(request.get("model"),
                                                         request.get("fingerprint")))
            except ProtocolError as exc:
                self._send(400, {"error": str(exc)})
            except Conflict as exc:
                self._send(409, {"error": str(exc), "code": exc.code})
            except DcpoError as exc:
                self._send(422, {"error": str(exc)})
            except OSError:
                pass  # the client went away
            except Exception as exc:  # the engine's own failure: logged here, one line there
                traceback.print_exc()
                self._send(500, {"error": f"{type(exc).__name__}: {first_line(exc)}"})

        def _generate(self, request: dict) -> None:
            prompts = protocol.prompts_from_json(request.get("prompt_token_ids"))
            settings = protocol.settings_from_json(request.get("settings"))
            fingerprint = request.get("fingerprint")
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()
            lines = _Lines(self.wfile)
            threading.Thread(target=lines.beat, daemon=True).start()
            started = time.perf_counter()
            try:
                completions, used = service.generate(
                    prompts, settings, fingerprint,
                    lambda responses, tokens: lines.write({"progress": [responses, tokens]}))
                reply = {"completions": [[protocol.completion_to_json(c) for c in group]
                                         for group in completions], "fingerprint": used}
            except Conflict as exc:
                reply = {"error": str(exc), "code": exc.code}
            except DcpoError as exc:
                reply = {"error": str(exc)}
            except OSError:
                lines.done.set()
                err.print("generate: the client went away; stopped", highlight=False)
                return
            except Exception as exc:
                traceback.print_exc()
                reply = {"error": f"the engine failed ({type(exc).__name__}: "
                                  f"{first_line(exc)})"}
            finally:
                lines.done.set()
            lines.write(reply)
            if "completions" in reply:
                tokens = sum(len(c.token_ids) for group in completions for c in group)
                err.print(f"generate: {len(prompts)} prompts x {settings.n} -> {tokens} tokens "
                          f"in {time.perf_counter() - started:.2f} s", highlight=False)

    return Handler


def make_server(service: GenerationService, host: str, port: int,
                token: str | None) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(service, token))
    server.daemon_threads = True
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"
