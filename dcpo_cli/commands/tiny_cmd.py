"""`dcpo tiny ...`: the built-in tiny model and arithmetic task."""

from pathlib import Path

import typer

app = typer.Typer(help="The built-in tiny model and arithmetic task (no downloads needed).",
                  no_args_is_help=True)


@app.command("init")
def init(
    directory: Path = typer.Argument(..., help="New directory for model/, train.parquet, "
                                     "test.parquet and summary.json."),
    seed: int = typer.Option(0, help="Seed for weights, data and the warm start."),
    size: str = typer.Option("default", help="default (the ~0.8 M parameter demo model) or "
                             "test (a reduced configuration that trains in seconds)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Train from scratch (2-3 minutes on "
                                 "2 cores) instead of copying the prebuilt seed-0 default "
                                 "model; other seeds and sizes are always trained."),
) -> None:
    """Write a tiny Qwen2 model, warm-started on an arithmetic task, plus its train/test prompts
    (seed 0 at the default size is copied, prebuilt, in seconds)."""
    from dcpo_cli.console import out
    from dcpo_cli.tiny import init_tiny, summary_table

    result = init_tiny(directory, seed=seed, size=size, rebuild=rebuild)
    out.print(summary_table(result))
