"""Starting and stopping `dcpo serve`: load the engine once, listen, write the address for
scripts (`--url-file`, written once the engine is ready and removed at exit), stop cleanly
on SIGTERM or Ctrl-C."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from dcpo_cli.console import err, out
from dcpo_cli.engines.settings import EngineSettings
from dcpo_cli.errors import DcpoError
from dcpo_cli.serve.server import LOOPBACK, GenerationService, make_server, server_url


def serve(model: str, engine: str, settings: EngineSettings, *, host: str = "127.0.0.1",
          port: int = 8765, token: str | None = None, url_file: Path | None = None,
          release_between: bool = False) -> None:
    from dcpo_cli.engines import SERVABLE, load_engine, pick_engine
    from dcpo_cli.files import contracts
    from dcpo_cli.files.model_source import resolve_model

    if engine not in SERVABLE:
        raise DcpoError(f"--engine {engine!r}: dcpo serve holds one of {', '.join(SERVABLE)}")
    if not 0 <= port <= 65535:
        raise DcpoError(f"--port {port}: expected 0 (any free port) to 65535")
    if token is not None and not token.strip():
        raise DcpoError("--token is empty")
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
    if host not in LOOPBACK:
        err.print(f"[yellow]warning:[/] listening on {host}, not loopback: whoever reaches "
                  "this port can generate and make the server read model directories on "
                  "this machine" + ("" if token else "; pass --token to require a token"),
                  highlight=False)
    started = time.perf_counter()
    loaded = load_engine(kind, source.path, **options)
    service = GenerationService(loaded, kind, settings, source, release_between)
    try:
        server = make_server(service, host, port, token)
    except OSError as exc:
        raise DcpoError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    url = server_url(server)
    # SIGTERM (the example scripts' trap, a scheduler) ends the server like Ctrl-C
    signal.signal(signal.SIGTERM, _stop)
    try:
        if url_file is not None:
            with contracts.atomic_path(url_file) as tmp:
                tmp.write_text(url + "\n")
        out.print(f"dcpo serve: {kind} engine with {source.spec} ready in "
                  f"{time.perf_counter() - started:.1f} s on {url}"
                  + (" (token required)" if token else ""), highlight=False)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if url_file is not None and Path(url_file).is_file():
            os.unlink(url_file)
        close = getattr(loaded, "close", None)
        if callable(close):
            close()
        err.print("dcpo serve: stopped", highlight=False)


def _stop(*_) -> None:
    raise KeyboardInterrupt
