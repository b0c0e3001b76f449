"""`dcpo eval`: Avg@1, Avg@k, pass@k and maj@k on math benchmarks."""

from pathlib import Path

import typer

from dcpo_cli.commands import engine_flags
from dcpo_cli.commands.help_format import group
from dcpo_cli.engines import ENGINES
from dcpo_cli.evaluate.sets import REGISTRY
from dcpo_cli.options import TRACKERS, EvalOptions, choices

D = EvalOptions()  # the defaults


def evaluate(
    *,  # keyword-only: typer passes every option by name
    model: str = typer.Option(..., help="Model directory, checkpoint, or Hugging Face Hub id "
                              "(org/name[@revision], fetched into the Hugging Face cache)."),
    benchmark: list[str] = typer.Option(..., help=f"{', '.join(REGISTRY)} (bundled), a prompts "
                                        "Parquet / JSONL / verl Parquet file, or a Hub dataset "
                                        "owner/name. Repeatable."),
    out: Path = typer.Option(..., help="Output directory (summary.json, <benchmark>/"
                             "samples.parquet)."),
    avg_at: int = typer.Option(D.avg_at, "--avg-at", help="K sampled responses per problem "
                               "for avg@K, pass@K and maj@K; 0 = greedy only."),
    greedy: bool = typer.Option(D.greedy, "--greedy/--no-greedy", help="Also decode greedily "
                                "(avg@1)."),
    pass_at: list[int] = typer.Option([], "--pass-at", help="Extra pass@k values to report "
                                      "(k <= K). Repeatable."),
    data_dir: Path | None = typer.Option(None, help="Folder with the benchmark files (aime24.jsonl"
                                         " ... or verl/aime_2024.parquet ...); default "
                                         "$DCPO_DATA_DIR, else the copies bundled with dcpo."),
    engine: str = typer.Option(D.engine, help=f"Generation engine: {choices(ENGINES)} "
                               "(server: a running `dcpo serve`, see --server-url)."),
    temperature: float = typer.Option(D.temperature, help="Sampling temperature for avg@K."),
    top_p: float = typer.Option(D.top_p, help="Nucleus sampling for avg@K."),
    top_k: int = typer.Option(D.top_k, help="Top-k sampling for avg@K (0 = off)."),
    max_new_tokens: int = typer.Option(D.max_new_tokens, help="Longest response, in tokens."),
    seed: int = typer.Option(D.seed, help="Sampling seed."),
    instruction: str = typer.Option(D.instruction, help="The instruction given with each "
                                    "problem ('' for none). verl-layout files keep their own "
                                    "messages."),
    instruction_in: str = typer.Option(D.instruction_in, help="Where the instruction goes: "
                                       "system (the official layout: instruction as the system "
                                       "message, bare problem as the user message) or user "
                                       "(appended to the problem)."),
    limit: int | None = typer.Option(None, help="Only the first N problems of each benchmark."),
    chat_template: bool = typer.Option(D.chat_template, "--chat-template/--no-chat-template",
                                       help="Render prompts with the model's chat template."),
    report_to: list[str] = typer.Option([], "--report-to", help="Also log the summary to "
                                        f"{choices(TRACKERS)}, at the checkpoint's global "
                                        "step (repeatable)."),
    tracker_dir: Path | None = typer.Option(None, help="Where --report-to keeps its run ids "
                                            "(trackers.json): the run directory to join "
                                            "(default: the nearest folder at or above --out "
                                            "that has one, else --out)."),
    tensor_parallel_size: int = engine_flags.TENSOR_PARALLEL_SIZE,
    gpu_memory_utilization: float | None = engine_flags.GPU_MEMORY_UTILIZATION,
    max_model_len: int | None = engine_flags.MAX_MODEL_LEN,
    dtype: str = engine_flags.DTYPE,
    enforce_eager: bool = engine_flags.ENFORCE_EAGER,
    engine_arg: list[str] = engine_flags.ENGINE_ARG,
    verbose: bool = engine_flags.VERBOSE,
    no_verify: bool = engine_flags.NO_VERIFY,
    server_url: str | None = engine_flags.SERVER_URL,
    server_token: str | None = engine_flags.SERVER_TOKEN,
) -> None:
    """Evaluate a model on benchmarks the way the paper does (percent; re-runs with the same
    options skip finished benchmarks)."""
    engine_flags.apply_no_verify(no_verify)
    from dcpo_cli.console import out as console
    from dcpo_cli.evaluate.stage import run_eval, summary_table
    from dcpo_cli.options import from_values
    from dcpo_cli.options import report_to as tracker_names
    from dcpo_cli.trackers.session import Trackers, tracker_home_for_eval

    options = from_values(EvalOptions, locals(), pass_at=sorted(set(pass_at)))
    settings = engine_flags.engine_settings(locals())
    server = engine_flags.server_address(locals())
    names = tracker_names(report_to)
    home = tracker_dir or tracker_home_for_eval(out)
    trackers = Trackers(names, home, Path(home).resolve().name,
                        {"eval": {**options.__dict__, "model": model, "benchmark": benchmark}})
    try:
        results = run_eval(model, benchmark, out, options, data_dir=data_dir,
                           engine_settings=settings, server=server,
                           trackers=trackers)
    finally:
        trackers.close()
    console.print(summary_table(results, out / "summary.json"))


# The panels of the command's --help (commands/help_format.py).
group(evaluate, {
    "Metrics": ("avg_at", "greedy", "pass_at"),
    "Sampling": ("temperature", "top_p", "top_k", "max_new_tokens", "seed"),
    "Prompts": ("instruction", "instruction_in", "chat_template"),
    "Engine": ("engine",),
})
