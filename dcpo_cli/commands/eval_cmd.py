"""`dcpo eval`: Avg@1, Avg@k, pass@k and maj@k on math benchmarks."""

from pathlib import Path

import typer

from dcpo_cli.commands.declared import command, panels
from dcpo_cli.engines.settings import EngineSettings, ServerAddress
from dcpo_cli.evaluate.sets import REGISTRY
from dcpo_cli.options import EvalOptions, LoadOptions, TrackerOptions


def _evaluate(
    *,
    model: str = typer.Option(..., help="Model directory, checkpoint, or Hugging Face Hub id "
                              "(org/name[@revision], fetched into the Hugging Face cache)."),
    benchmark: list[str] = typer.Option(..., help=f"{', '.join(REGISTRY)} (bundled), a prompts "
                                        "Parquet / JSONL / verl Parquet file, or a Hub dataset "
                                        "owner/name. Repeatable."),
    out: Path = typer.Option(..., help="Output directory (summary.json, <benchmark>/"
                             "samples.parquet)."),
    data_dir: Path | None = typer.Option(None, help="Folder with the benchmark files (aime24.jsonl"
                                         " ... or verl/aime_2024.parquet ...); default "
                                         "$DCPO_DATA_DIR, else the copies bundled with dcpo."),
    tracker_dir: Path | None = typer.Option(None, help="Where --report-to keeps its run ids "
                                            "(trackers.json): the run directory to join "
                                            "(default: the nearest folder at or above --out "
                                            "that has one, else --out)."),
    options: EvalOptions, trackers: TrackerOptions, engine: EngineSettings,
    server: ServerAddress, load: LoadOptions,
) -> None:
    """Evaluate a model on benchmarks the way the paper does (percent; re-runs with the same
    options skip finished benchmarks)."""
    from dcpo_cli.commands.shared import apply_load_options, server_address
    from dcpo_cli.console import out as console
    from dcpo_cli.evaluate.stage import run_eval, summary_table
    from dcpo_cli.trackers.session import Trackers, tracker_home_for_eval

    apply_load_options(load)
    engine.check()
    address = server_address(server)
    home = tracker_dir or tracker_home_for_eval(out)
    run_trackers = Trackers(list(trackers.report_to), home, Path(home).resolve().name,
                            {"eval": {**options.__dict__, "model": model,
                                      "benchmark": benchmark}})
    try:
        results = run_eval(model, benchmark, out, options, data_dir=data_dir,
                           engine_settings=engine, server=address, trackers=run_trackers)
    finally:
        run_trackers.close()
    console.print(summary_table(results, out / "summary.json"))


evaluate = panels(command(_evaluate, options=EvalOptions, trackers=TrackerOptions,
                          engine=EngineSettings, server=ServerAddress, load=LoadOptions),
                  ("Metrics", "Sampling", "Prompts", "Engine", "Checkpointing"))
