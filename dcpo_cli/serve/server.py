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
dtype and version fields; anything else needs a server started on that model. A load is
check-then-commit: the whole checkpoint is read and checked (names, shapes, dtypes) before
the engine is touched, so a refused load leaves the served weights, fingerprint and load
count as they were; should the engine fail half-way anyway, the server claims no weights
(fingerprint null, every generate refused as "other weights") until a load succeeds.

Every request is checked against the served model before the engine sees it (token ids in
its vocabulary, prompt + max_new_tokens within its context, the server's size bounds); a
generation stops between decoding steps (hf) or chunks (vLLM) once its client is gone, its
time (`--request-timeout`) is up or the server stops.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import select
import socket
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
from dcpo_cli.engines.base import Stopped
from dcpo_cli.engines.protocol import ProtocolError
from dcpo_cli.engines.settings import EngineSettings
from dcpo_cli.errors import DcpoError, first_line
from dcpo_cli.files.model_source import ModelSource, model_identity

HEARTBEAT = 5.0  # seconds between lines on an open generate request
POLL = 0.25  # seconds between looks at a waiting request's client and time
MAX_BODY = 1 << 30  # bytes of a request body
# config.json fields an in-place load may change: how the file was written, and use_cache
# (train-step saves it off; generation takes it from the engine's own generation config)
CONFIG_FREE = {"dtype", "torch_dtype", "transformers_version", "_name_or_path", "use_cache"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True)
class Limits:
    """What one generate request may ask for (`dcpo serve` options)."""

    max_responses: int = 65_536  # prompts x n
    max_request_tokens: int = 1 << 28  # prompts x n x (prompt + max_new_tokens)
    request_timeout: float = 6 * 3600.0  # seconds from arrival to answer; 0: no bound

    def check(self) -> None:
        if self.max_responses < 1:
            raise DcpoError(f"--max-responses {self.max_responses}: must be at least 1")
        if self.max_request_tokens < 1:
            raise DcpoError(f"--max-request-tokens {self.max_request_tokens}: must be at "
                            "least 1")
        if not 0 <= self.request_timeout < float("inf"):
            raise DcpoError(f"--request-timeout {self.request_timeout}: expected seconds "
                            ">= 0 (0: no bound)")


class TooLarge(Exception):
    """A request beyond the server's size bounds (413)."""


class Unavailable(Exception):
    """The server is stopping (503)."""


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
    """The checkpoint-named tensors of a model directory (safetensors, else .bin files),
    all read before anything is loaded: an unreadable file is a DcpoError (422)."""
    import torch
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    tensors: dict[str, Any] = {}
    for file in files or sorted(Path(model_dir).glob("*.bin")):
        try:
            if file.suffix == ".safetensors":
                part = load_file(file)
            else:
                part = torch.load(file, map_location="cpu", weights_only=True)
            if not isinstance(part, dict):
                raise ValueError("not a dictionary of tensors")
        except Exception as exc:  # noqa: BLE001 (OSError, safetensors' and pickle's errors)
            raise DcpoError(f"{file}: unreadable weights ({type(exc).__name__}: "
                            f"{first_line(exc)})") from None
        repeated = part.keys() & tensors.keys()
        if repeated:
            raise DcpoError(f"{file}: tensor {min(repeated)} is in another weights file too")
        tensors.update(part)
    if not tensors:
        raise DcpoError(f"{model_dir}: no weights (*.safetensors or *.bin)")
    return tensors


def context_length(engine: Any, model_dir: Path) -> int | None:
    """The most tokens (prompt + response) the served engine takes: vLLM's max_model_len,
    else config.json's position limit; None where neither says."""
    try:
        return int(engine.llm.llm_engine.model_config.max_model_len)
    except (AttributeError, TypeError, ValueError):
        pass
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


def embedding_rows(engine: Any, model_dir: Path) -> int:
    """How many token ids the served model embeds (config.json's vocab_size)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    size = config.get("text_config", config).get("vocab_size")
    return size if isinstance(size, int) and size > 0 else protocol.vocabulary_size(
        engine.tokenizer)


@dataclass
class Served:
    source: ModelSource
    fingerprint: str


class GenerationService:
    """The engine and the model it holds, behind one lock."""

    def __init__(self, engine: Any, kind: str, settings: EngineSettings, source: ModelSource,
                 release_between: bool = False, limits: Limits | None = None) -> None:
        self.engine, self.kind = engine, kind
        self.settings_record = settings.record()
        self.lock = threading.Lock()
        self.served: Served | None = Served(source, model_identity(source))
        self.vocabulary = protocol.vocabulary_fingerprint(engine.tokenizer, engine.eos_ids)
        self.config = comparable_config(source.path)
        self.release_between = release_between
        self.limits = limits or Limits()
        self.context = context_length(engine, source.path)
        self.vocab_size = embedding_rows(engine, source.path)
        layout = getattr(engine, "weight_layout", None)
        if callable(layout):
            self.layout = layout()
        else:
            from dcpo_cli.engines.weights import config_layout

            self.layout = config_layout(source.path)
        self.loads = 0
        self.stopping = threading.Event()
        self.active = 0  # requests answering (`stop` lets them write their last line)
        self.idle = threading.Condition()

    def identity(self) -> dict[str, Any]:
        served = self.served
        model = None if served is None else {
            **served.source.record(), "path": str(served.source.path.resolve()),
            "revision": served.source.revision}
        return {"dcpo_version": __version__, "protocol": protocol.PROTOCOL,
                "engine": self.kind, "engine_settings": self.settings_record,
                "model": model, "fingerprint": None if served is None else served.fingerprint,
                "vocabulary": self.vocabulary, "weight_loads": self.loads,
                "limits": {"vocab_size": self.vocab_size, "context_length": self.context,
                           "max_responses": self.limits.max_responses,
                           "max_request_tokens": self.limits.max_request_tokens,
                           "request_timeout": self.limits.request_timeout}}

    def check_request(self, prompts: list[list[int]], settings, fingerprint: Any) -> None:
        """Refuse, before anything is streamed, what the served model or the server's bounds
        do not allow (400, 413) and other weights than the served ones (409)."""
        if self.stopping.is_set():
            raise Unavailable("the server is stopping")
        if not isinstance(fingerprint, str):
            raise ProtocolError("fingerprint: expected the weights' fingerprint (a string)")
        for index, ids in enumerate(prompts):
            if max(ids) >= self.vocab_size:
                raise ProtocolError(f"prompt_token_ids[{index}]: token id {max(ids)} outside "
                                    f"the served model's vocabulary [0, {self.vocab_size})")
        if settings.top_k > self.vocab_size:
            raise ProtocolError(f"settings.top_k {settings.top_k}: more than the vocabulary "
                                f"({self.vocab_size}; 0: no top-k filter)")
        if self.context is not None:
            if settings.max_new_tokens >= self.context:
                raise ProtocolError(f"settings.max_new_tokens {settings.max_new_tokens}: the "
                                    f"served model's context is {self.context} tokens, "
                                    "prompt included")
            longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
            if len(prompts[longest]) + settings.max_new_tokens > self.context:
                raise ProtocolError(
                    f"prompt_token_ids[{longest}]: {len(prompts[longest])} prompt tokens + "
                    f"max_new_tokens {settings.max_new_tokens} exceed the served model's "
                    f"context of {self.context} tokens (rollout: lower --max-new-tokens or "
                    "set --max-prompt-tokens)")
        responses = len(prompts) * settings.n
        if responses > self.limits.max_responses:
            raise TooLarge(f"{len(prompts)} prompts x n {settings.n} = {responses} responses; "
                           f"this server takes at most {self.limits.max_responses} per request "
                           "(dcpo serve --max-responses)")
        tokens = settings.n * sum(len(ids) + settings.max_new_tokens for ids in prompts)
        if tokens > self.limits.max_request_tokens:
            raise TooLarge(f"up to {tokens} tokens (prompts x n x (prompt + max_new_tokens)); "
                           f"this server takes at most {self.limits.max_request_tokens} per "
                           "request (dcpo serve --max-request-tokens)")
        self._check_fingerprint(fingerprint)

    def _check_fingerprint(self, fingerprint: str) -> None:
        served = self.served
        if served is None:
            raise Conflict("it serves no weights it can name (a load failed half-way); load "
                           "weights again", "other_weights")
        if fingerprint != served.fingerprint:
            raise Conflict(f"it serves {served.source.spec} (fingerprint "
                           f"{served.fingerprint[:12]}), not the weights asked for "
                           f"({fingerprint[:12]})", "other_weights")

    def generate(self, prompts: list[list[int]], settings, fingerprint: str, on_progress,
                 should_stop):
        """The completions and the fingerprint they were generated with, or `Stopped` (also
        while waiting for the engine) once `should_stop()`."""
        while not self.lock.acquire(timeout=POLL):
            if should_stop():
                raise Stopped()
        try:
            if should_stop():
                raise Stopped()
            self._check_fingerprint(fingerprint)
            try:
                completions = self.engine.generate(prompts, settings, on_progress, should_stop)
            finally:
                if self.release_between:
                    self._release()
            return completions, fingerprint
        finally:
            self.lock.release()

    def _release(self) -> None:
        release = getattr(self.engine, "release", None)
        if callable(release):
            release()

    @contextlib.contextmanager
    def answering(self):
        """Around a request's answer, so that `stop` waits for it to be written."""
        with self.idle:
            self.active += 1
        try:
            yield
        finally:
            with self.idle:
                self.active -= 1
                self.idle.notify_all()

    def stop(self, grace: float = 30.0) -> None:
        """Refuse new requests, stop the generation in flight, wait until the engine is free
        (a weight load in flight finishes), then up to `grace` seconds for the requests'
        last lines to be written."""
        self.stopping.set()
        self.lock.acquire()
        with self.idle:
            self.idle.wait_for(lambda: self.active == 0, timeout=grace)

    def load_weights(self, record: Any, fingerprint: Any) -> dict[str, Any]:
        if self.stopping.is_set():
            raise Unavailable("the server is stopping")
        source = self._source(record)
        if not isinstance(fingerprint, str):
            raise ProtocolError("fingerprint: expected the weights' fingerprint (a string)")
        try:
            seen = model_identity(source)
        except OSError as exc:
            raise DcpoError(f"{source.path}: unreadable ({exc.strerror or exc})") from None
        if seen != fingerprint:
            raise Conflict(f"{source.path}: the server sees other files there than the client "
                           "(fingerprints differ); the server must share the client's file "
                           "system")
        if self.served is not None and seen == self.served.fingerprint:
            return self.identity()  # already served: a repeated or concurrent request
        self._check_compatible(source.path)
        # Check, then commit: everything read and checked before the engine is touched
        from dcpo_cli.engines.weights import check_weights

        tensors = read_weights(source.path)
        check_weights(tensors, self.layout)
        with self.lock:
            if self.served is None or seen != self.served.fingerprint:
                started = time.perf_counter()
                try:
                    self.engine.load_weights(tensors.items())
                except BaseException:
                    self.served = None  # half-loaded: claim nothing until a load succeeds
                    raise
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
        if "\0" in record["path"] or not Path(record["path"]).is_absolute():
            raise ProtocolError("model.path: expected an absolute path")
        if not isinstance(record.get("spec"), str | None):
            raise ProtocolError("model.spec: expected a string or null")
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
        self.gone = threading.Event()  # the client went away

    def write(self, value: dict) -> None:
        with self.lock:
            try:
                self.wfile.write(protocol.dumps(value) + b"\n")
                self.wfile.flush()
            except OSError:
                self.gone.set()
                raise

    def beat(self) -> None:
        while not self.done.wait(HEARTBEAT):
            try:
                self.write({"wait": True})
            except OSError:  # the client went away; the generation stops at its next look
                return

    def watch(self, connection: socket.socket) -> None:
        """Notice a client that closed its connection (the request is read whole, so the
        socket reads as end-of-file) while its request waits or generates."""
        while not self.done.is_set() and not self.gone.is_set():
            try:
                readable, _, _ = select.select([connection], [], [], POLL)
                if readable and not connection.recv(1, socket.MSG_PEEK):
                    self.gone.set()
                elif readable:
                    self.done.wait(POLL)  # bytes past the request: not ours to read
            except (OSError, ValueError):
                self.gone.set()


# status of each refusal the handler answers with `{"error": ...}` (and `code` for 409)
STATUSES = ((ProtocolError, 400), (TooLarge, 413), (Conflict, 409), (DcpoError, 422),
            (Unavailable, 503))


def make_handler(token: str | None):
    """The request handler; its engine is the server's `service` (set once it is loaded)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = f"dcpo-serve/{__version__}"

        @property
        def service(self) -> GenerationService:
            return self.server.service

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base's name)
            pass  # requests are logged by what they did, below

        def send_error(self, code: int, message: str | None = None,
                       explain: str | None = None) -> None:
            """The base class's errors (a malformed request line, an unknown method) as
            JSON, as every other error."""
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send(code, {"error": message or self.responses.get(code, ("",))[0]})

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
            given = self.headers.get("Authorization", "").encode("latin-1", "replace")
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
            if length < 0:
                raise ProtocolError(f"Content-Length {length}")
            if length > MAX_BODY:
                raise TooLarge(f"request body of {length} bytes (at most {MAX_BODY})")
            try:
                value = json.loads(self.rfile.read(length))
            except ValueError:
                raise ProtocolError("the request body is not JSON") from None
            except RecursionError:
                raise ProtocolError("the request body nests too deep") from None
            if not isinstance(value, dict):
                raise ProtocolError("the request body must be a JSON object")
            return value

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path == "/health":
                self._send(200, self.service.identity())
            else:
                self._send(404, {"error": f"no endpoint {self.path} (GET /health)"})

        def do_POST(self) -> None:
            if not self._authorized():
                return
            if self.path not in ("/generate", "/load-weights"):
                self._send(404, {"error": f"no endpoint {self.path} (POST /generate, "
                                 "/load-weights)"})
                return
            with self.service.answering():
                try:
                    request = self._request()
                    if self.path == "/generate":
                        self._generate(request)
                    else:
                        self._send(200, self.service.load_weights(request.get("model"),
                                                                  request.get("fingerprint")))
                except ConnectionError:
                    pass  # the client went away
                except Exception as exc:  # noqa: BLE001 (each answered with a status)
                    with contextlib.suppress(OSError):
                        self._send(*self._refusal(exc))

        @staticmethod
        def _refusal(exc: Exception) -> tuple[int, dict]:
            """The status and JSON body that answer a request `exc` ended."""
            status = next((code for kind, code in STATUSES if isinstance(exc, kind)), None)
            reply = {"error": str(exc)}
            if isinstance(exc, Conflict):
                reply["code"] = exc.code
            if isinstance(exc, OSError):  # a file the server could not read
                status, reply = 422, {"error": f"{exc.filename or 'a file'}: "
                                               f"{exc.strerror or exc}"}
            if status is None:  # the engine's own failure: logged here, one line there
                traceback.print_exc()
                status, reply = 500, {"error": f"{type(exc).__name__}: {first_line(exc)}"}
            return status, reply

        def _generate(self, request: dict) -> None:
            prompts = protocol.prompts_from_json(request.get("prompt_token_ids"))
            settings = protocol.settings_from_json(request.get("settings"))
            fingerprint = request.get("fingerprint")
            service = self.service
            service.check_request(prompts, settings, fingerprint)
            started = time.monotonic()
            timeout = service.limits.request_timeout

            def should_stop() -> bool:
                return lines.gone.is_set() or service.stopping.is_set() or \
                    bool(timeout) and time.monotonic() - started > timeout

            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()
            lines = _Lines(self.wfile)
            threading.Thread(target=lines.beat, daemon=True).start()
            threading.Thread(target=lines.watch, args=(self.connection,), daemon=True).start()
            try:
                completions, used = service.generate(
                    prompts, settings, fingerprint,
                    lambda responses, tokens: lines.write({"progress": [responses, tokens]}),
                    should_stop)
                reply = {"completions": [[protocol.completion_to_json(c) for c in group]
                                         for group in completions], "fingerprint": used}
            except (Stopped, OSError) as exc:
                if lines.gone.is_set() or isinstance(exc, OSError):
                    lines.done.set()
                    err.print("generate: the client went away; stopped", highlight=False)
                    return
                reply = ({"error": "the server is stopping", "code": "stopping"}
                         if service.stopping.is_set() else
                         {"error": f"the request ran past the server's --request-timeout of "
                                   f"{timeout:g} s", "code": "timeout"})
            except Conflict as exc:
                reply = {"error": str(exc), "code": exc.code}
            except DcpoError as exc:
                reply = {"error": str(exc)}
            except Exception as exc:  # noqa: BLE001 (the engine's failure, one line there)
                traceback.print_exc()
                reply = {"error": f"the engine failed ({type(exc).__name__}: "
                                  f"{first_line(exc)})"}
            finally:
                lines.done.set()
            with contextlib.suppress(OSError):
                lines.write(reply)
            if "completions" in reply:
                tokens = sum(len(c.token_ids) for group in completions for c in group)
                err.print(f"generate: {len(prompts)} prompts x {settings.n} -> {tokens} tokens "
                          f"in {time.monotonic() - started:.2f} s", highlight=False)

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a request thread never holds the exit (`stop` waits for engines)
    service: GenerationService | None = None


def make_server(host: str, port: int, token: str | None) -> Server:
    """Listen on host:port (before the engine loads: a bad address fails fast); requests
    are served once `server.service` is set."""
    return Server((host, port), make_handler(token))


def server_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"
