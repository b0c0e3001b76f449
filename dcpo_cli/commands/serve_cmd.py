"""`dcpo serve`: one generation engine kept loaded for the stages of a shell loop."""

from pathlib import Path

import typer

from dcpo_cli.commands.declared import command, panels
from dcpo_cli.engines.settings import EngineSettings
from dcpo_cli.options import SERVABLE, choices


def _serve(
    *,
    model: str = typer.Option(..., help="Model directory, checkpoint, or Hugging Face Hub id "
                              "to serve first (clients load others of the same vocabulary "
                              "in place)."),
    engine: str = typer.Option("auto", help=f"{choices(SERVABLE)} (auto: vllm when importable "
                               "and a GPU is present, else hf).", rich_help_panel="Engine"),
    port: int = typer.Option(8765, help="TCP port to listen on (0: any free port; see "
                             "--url-file).", rich_help_panel="Server"),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Anything but loopback "
                             "lets other machines in (a warning says so; add --token).",
                             rich_help_panel="Server"),
    token: str | None = typer.Option(None, envvar="DCPO_SERVER_TOKEN", help="Require this "
                                     "token on every request (clients: --server-token or "
                                     "DCPO_SERVER_TOKEN).", rich_help_panel="Server"),
    url_file: Path | None = typer.Option(None, help="Write the server's URL here once the "
                                         "engine is ready (removed when it stops): how "
                                         "scripts wait for it.", rich_help_panel="Server"),
    release_between_requests: bool = typer.Option(
        False, "--release-between-requests", help="vLLM on GPUs: free the KV cache after "
        "each request (sleep mode level 1), so train-step can use the GPUs between rollouts.",
        rich_help_panel="Server"),
    settings: EngineSettings,
) -> None:
    """Serve generation over HTTP (127.0.0.1 by default) for `dcpo rollout --engine server`
    and `dcpo eval --engine server`; stop it with Ctrl-C or SIGTERM."""
    from dcpo_cli.serve.run import serve as run_server

    settings.check()
    run_server(model, engine, settings, host=host, port=port, token=token, url_file=url_file,
               release_between=release_between_requests)


serve = panels(command(_serve, settings=EngineSettings), ("Server", "Engine"))
