"""`dcpo eval`: Avg@1, Avg@k, pass@k and maj@k on math benchmarks."""

from pathlib import Path

import typer

from dcpo_cli.errors import DcpoError


def evaluate(
    model: Path = typer.Option(..., help="Model directory or checkpoint."),
    benchmark: list[str] = typer.Option(..., help="aime24, aime25, amc23, math500, gsm8k or a file."),
    out: Path = typer.Option(..., help="Output directory."),
) -> None:
    """Evaluate a model on benchmarks the way the paper does."""
    raise DcpoError("dcpo eval is not built yet (issue: eval)")
