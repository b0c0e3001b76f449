"""`dcpo tiny ...`: the built-in tiny model and arithmetic task."""

from pathlib import Path

import typer

from dcpo_cli.errors import DcpoError

app = typer.Typer(help="The built-in tiny model and arithmetic task (no downloads needed).",
                  no_args_is_help=True)


@app.command("init")
def init(
    directory: Path = typer.Argument(..., help="Where to build model/, train.parquet, test.parquet."),
    seed: int = typer.Option(0, help="Seed for weights and data."),
) -> None:
    """Build a tiny Qwen2 model, warm-started on an arithmetic task, plus its train/test prompts."""
    raise DcpoError("dcpo tiny init is not built yet (issue: the embedded default)")
