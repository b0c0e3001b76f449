"""`dcpo serve`: one generation engine kept loaded for the stages of a shell loop."""

from pathlib import Path

import typer

from dcpo_cli.commands.declared import command, panels
from dcpo_cli.engines.settings import EngineSettings
from dcpo_cli.options import SERVABLE, choices

SERVER, LIMITS = "Server", "Request limits"


def _serve(
    *,
    model: str = typer.Option(..., help="Model directory, checkpoint, or Hugging Face Hub id "
                              "to serve first (clients load others of the same vocabulary "
                              "in place)."),
    engine: str = typer.Option("auto", help=f"{choices(SERVABLE)} (auto: vllm when importable "
                               "and a GPU is present, else hf).", rich_help_panel="Engine"),
    port: int = typer.Option(8765, help="TCP port to listen on (0: any free port; see "
                             "--url-file).", rich_help_panel=SERVER),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Anything but loopback "
                             "lets other machines in (a warning says so; add --token).",
                             rich_help_panel=SERVER),
    token: str | None = typer.Option(None, envvar="DCPO_SERVER_TOKEN", help="Require this "
                                     "token on every request (clients: --server-token or "
                                     "DCPO_SERVER_TOKEN).", rich_help_panel=SERVER),
    url_file: Path | None = typer.Option(None, help="Write the server's URL here once the "
                                         "engine is ready (removed when it stops): how "
                                         "scripts wait for it.", rich_help_panel=SERVER),
    release_between_requests: bool = typer.Option(
        False, "--release-between-requests", help="vLLM on GPUs: free the KV cache after "
        "each request (sleep mode level 1), so train-step can use the GPUs between rollouts.",
        rich_help_panel=SERVER),
    max_responses: int = typer.Option(65_536, help="Most responses (prompts x n) one "
                                      "request may ask for; more is refused (HTTP 413).",
                                      rich_help_panel=LIMITS),
    max_request_tokens: int = typer.Option(1 << 28, help="Most tokens one request may "
                                           "ask for (prompts x n x (prompt + "
                                           "max_new_tokens)); more is refused (HTTP 413).",
                                           rich_help_panel=LIMITS),
    request_timeout: float = typer.Option(21_600.0, help="Seconds a request may take from "
                                          "its arrival (waiting for the engine included) "
                                          "before its generation is stopped (0: no bound).",
                                          rich_help_panel=LIMITS),
    settings: EngineSettings,
) -> None:
    """Serve generation over HTTP (127.0.0.1 by default) for `dcpo rollout --engine server`
    and `dcpo eval --engine server`; stop it with Ctrl-C or SIGTERM."""
    from dcpo_cli.serve.run import serve as run_server
    from dcpo_cli.serve.server import Limits

    settings.check()
    limits = Limits(max_responses, max_request_tokens, request_timeout)
    run_server(model, engine, settings, host=host, port=port, token=token, url_file=url_file,
               release_between=release_between_requests, limits=limits)


serve = panels(command(_serve, settings=EngineSettings), (SERVER, LIMITS, "Engine"))
