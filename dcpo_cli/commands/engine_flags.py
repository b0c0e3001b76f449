"""The engine flags shared by `dcpo rollout` and `dcpo eval` (declared once, used in both).

Each command still lists the seven parameters in its signature (typer reads options from
the signature), which `duplicates` reports as a pair; the declarations live here."""

import typer

PANEL = "Engine"

TENSOR_PARALLEL_SIZE = typer.Option(
    1, "--tensor-parallel-size", rich_help_panel=PANEL,
    help="vLLM: GPUs one engine spans (tensor parallel). For data-parallel rollouts run one "
    "process per GPU group with --shard i/n.")
GPU_MEMORY_UTILIZATION = typer.Option(
    None, "--gpu-memory-utilization", rich_help_panel=PANEL,
    help="vLLM: share of each GPU's memory the engine may take (default: vLLM's own); on "
    "vLLM's CPU build, the share of CPU memory.")
MAX_MODEL_LEN = typer.Option(
    None, "--max-model-len", rich_help_panel=PANEL,
    help="vLLM: longest prompt + response it reserves room for (default: the model's "
    "context length).")
DTYPE = typer.Option(
    "auto", "--dtype", rich_help_panel=PANEL,
    help="Weights' dtype: auto, bfloat16, float16 or float32 (auto: bfloat16 on GPU, "
    "float32 on CPU for hf; the model's own for vLLM).")
ENFORCE_EAGER = typer.Option(
    False, "--enforce-eager", rich_help_panel=PANEL,
    help="vLLM: no CUDA graphs or torch.compile (starts faster, generates slower).")
ENGINE_ARG = typer.Option(
    [], "--engine-arg", metavar="KEY=VALUE", rich_help_panel=PANEL,
    help="vLLM: any other engine argument, e.g. max_num_seqs=256 or "
    "enable_prefix_caching=false (VALUE read as JSON where it parses). Repeatable.")
VERBOSE = typer.Option(
    False, "--verbose", rich_help_panel=PANEL,
    help="Show the engine's own INFO logs and load progress bars (by default only its "
    "warnings and errors).")
# Not an engine flag: shared by every command that loads a checkpoint (rollout, eval,
# train-step, run); files/weights_checksum.py.
NO_VERIFY = typer.Option(
    False, "--no-verify", rich_help_panel="Checkpointing",
    help="Load checkpoints without checking their weights against the checksums recorded "
    "when they were written.")


def apply_no_verify(no_verify: bool) -> None:
    if no_verify:
        from dcpo_cli.files import weights_checksum

        weights_checksum.set_verify(False)


def engine_settings(values: dict):
    """The engine settings from a command's keyword values (its `locals()`), checked."""
    from dcpo_cli.engines.settings import EngineSettings, parse_engine_args

    settings = EngineSettings(
        tensor_parallel_size=values["tensor_parallel_size"],
        gpu_memory_utilization=values["gpu_memory_utilization"],
        max_model_len=values["max_model_len"], dtype=values["dtype"],
        enforce_eager=values["enforce_eager"],
        engine_args=parse_engine_args(values["engine_arg"]), verbose=values["verbose"])
    settings.check()
    return settings


SERVER_URL = typer.Option(None, "--server-url", rich_help_panel=PANEL,
                          help="With --engine server: the address of a "
                          "running `dcpo serve` (e.g. http://127.0.0.1:8765).")
SERVER_TOKEN = typer.Option(None, "--server-token", envvar="DCPO_SERVER_TOKEN",
                            rich_help_panel=PANEL,
                            help="With --engine server: the token the server was started "
                            "with (--token).")


def server_address(values: dict):
    """The `--server-url` / `--server-token` of a command's keyword values, or None."""
    from dcpo_cli.engines.settings import ServerAddress

    if values["server_url"] is None:
        return None
    address = ServerAddress(values["server_url"], values["server_token"])
    address.check()
    return address
