"""`dcpo serve`: one generation engine kept loaded for the stages of a shell loop."""

from pathlib import Path

import typer

from dcpo_cli.commands import engine_flags
from dcpo_cli.commands.help_format import group
from dcpo_cli.engines import SERVABLE
from dcpo_cli.options import choices


def serve(
    *,  # keyword-only: typer passes every option by name
    model: str = typer.Option(..., help="Model directory, checkpoint, or Hugging Face Hub id "
                              "to serve first (clients load others of the same vocabulary "
                              "in place)."),
    engine: str = typer.Option("auto", help=f"{choices(SERVABLE)} (auto: vllm when importable "
                               "and a GPU is present, else hf)."),
    port: int = typer.Option(8765, help="TCP port to listen on (0: any free port; see "
                             "--url-file)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Anything but loopback "
                             "lets other machines in (a warning says so; add --token)."),
    token: str | None = typer.Option(None, envvar="DCPO_SERVER_TOKEN", help="Require this "
                                     "token on every request (clients: --server-token or "
                                     "DCPO_SERVER_TOKEN)."),
    url_file: Path | None = typer.Option(None, help="Write the server's URL here once the "
                                         "engine is ready (removed when it stops): how "
                                         "scripts wait for it."),
    release_between_requests: bool = typer.Option(
        False, "--release-between-requests", help="vLLM on GPUs: free the KV cache after "
        "each request (sleep mode level 1), so train-step can use the GPUs between rollouts."),
    max_responses: int = typer.Option(65_536, help="Most responses (prompts x n) one "
                                      "request may ask for; more is refused (HTTP 413)."),
    max_request_tokens: int = typer.Option(1 << 28, help="Most tokens one request may "
                                           "ask for (prompts x n x (prompt + "
                                           "max_new_tokens)); more is refused (HTTP 413)."),
    request_timeout: float = typer.Option(21_600.0, help="Seconds a request may take from "
                                          "its arrival (waiting for the engine included) "
                                          "before its generation is stopped (0: no bound)."),
    tensor_parallel_size: int = engine_flags.TENSOR_PARALLEL_SIZE,
    gpu_memory_utilization: float | None = engine_flags.GPU_MEMORY_UTILIZATION,
    max_model_len: int | None = engine_flags.MAX_MODEL_LEN,
    dtype: str = engine_flags.DTYPE,
    enforce_eager: bool = engine_flags.ENFORCE_EAGER,
    engine_arg: list[str] = engine_flags.ENGINE_ARG,
    verbose: bool = engine_flags.VERBOSE,
) -> None:
    """Serve generation over HTTP (127.0.0.1 by default) for `dcpo rollout --engine server`
    and `dcpo eval --engine server`; stop it with Ctrl-C or SIGTERM."""
    from dcpo_cli.serve.run import serve as run_server
    from dcpo_cli.serve.server import Limits

    settings = engine_flags.engine_settings(locals())
    limits = Limits(max_responses, max_request_tokens, request_timeout)
    run_server(model, engine, settings, host=host, port=port, token=token, url_file=url_file,
               release_between=release_between_requests, limits=limits)


# The panels of the command's --help (commands/help_format.py).
group(serve, {
    "Server": ("port", "host", "token", "url_file", "release_between_requests"),
    "Request limits": ("max_responses", "max_request_tokens", "request_timeout"),
    "Engine": ("engine",),
})
