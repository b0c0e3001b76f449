"""Starting and stopping `dcpo serve`: check the flags and listen (before the slow engine
start, so a bad --host, --port or --token is one line at once), load the engine, write the
address for scripts (`--url-file`, written once the engine is ready and removed at exit),
and stop cleanly: SIGTERM or Ctrl-C stops the generation in flight (its client gets one
line), waits for the engine to be free, closes it, and exits 0 (SIGTERM) or 130 (Ctrl-C)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from dcpo_cli.console import err, out
from dcpo_cli.engines.settings import EngineSettings, check_token
from dcpo_cli.errors import DcpoError
from dcpo_cli.serve.server import (
    LOOPBACK,
    GenerationService,
    Limits,
    make_server,
    server_url,
)


def serve(model: str, engine: str, settings: EngineSettings, *, host: str = "127.0.0.1",
          port: int = 8765, token: str | None = None, url_file: Path | None = None,
          release_between: bool = False, limits: Limits | None = None) -> None:
    from dcpo_cli.engines import SERVABLE, load_engine, pick_engine
    from dcpo_cli.files import contracts
    from dcpo_cli.files.model_source import resolve_model

    if engine not in SERVABLE:
        raise DcpoError(f"--engine {engine!r}: dcpo serve holds one of {', '.join(SERVABLE)}")
    if not 0 <= port <= 65535:
        raise DcpoError(f"--port {port}: expected 0 (any free port) to 65535")
    if token is not None:
        check_token(token, "--token")
    limits = limits or Limits()
    limits.check()
    kind = pick_engine(engine)
    options = settings.options_for(kind)
    if kind == "vllm" and release_between:
        options["resident"] = True  # sleep mode must be chosen when vLLM starts
    if url_file is not None:
        contracts.check_output_path(url_file)
    source = resolve_model(model)
    from dcpo_cli.files.lora_adapter import is_adapter

    if is_adapter(source.path):
        raise DcpoError(f"{model}: a LoRA checkpoint; dcpo serve holds full weights only "
                        "(serve its base model or `dcpo export` it)")
    try:
        server = make_server(host, port, token)
    except (OSError, OverflowError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise DcpoError(f"cannot listen on {host}:{port} ({reason})") from None
    if host not in LOOPBACK:
        err.print(f"[yellow]warning:[/] listening on {host}, not loopback: whoever reaches "
                  "this port can generate and make the server read model directories on "
                  "this machine" + ("" if token else "; pass --token to require a token"),
                  highlight=False)
    loaded, interrupted, terminated = None, False, threading.Event()

    def interrupt(*_) -> None:  # SIGTERM during the engine start: stop as Ctrl-C does
        terminated.set()
        raise KeyboardInterrupt

    def terminate(*_) -> None:  # SIGTERM (the example scripts' trap, a scheduler)
        terminated.set()
        if server.service is not None:
            server.service.stopping.set()  # the generation in flight stops at its next look
        threading.Thread(target=server.shutdown, daemon=True).start()

    try:
        started = time.perf_counter()
        signal.signal(signal.SIGTERM, interrupt)
        loaded = load_engine(kind, source.path, **options)
        server.service = GenerationService(loaded, kind, settings, source, release_between,
                                           limits)
        signal.signal(signal.SIGTERM, terminate)
        url = server_url(server)
        if url_file is not None:
            with contracts.atomic_path(url_file) as tmp:
                tmp.write_text(url + "\n")
        out.print(f"dcpo serve: {kind} engine with {source.spec} ready in "
                  f"{time.perf_counter() - started:.1f} s on {url}"
                  + (" (token required)" if token else ""), highlight=False)
        server.serve_forever()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopping already
        if server.service is not None:
            server.service.stop()  # no engine work left when the engine closes
        server.server_close()
        if url_file is not None and Path(url_file).is_file():
            os.unlink(url_file)
        close = getattr(loaded, "close", None)
        if callable(close):
            close()
        err.print("dcpo serve: stopped", highlight=False)
    if interrupted and not terminated.is_set():
        raise KeyboardInterrupt  # exit 130, as any command stopped by Ctrl-C
