"""`dcpo score`: verify responses and attach rewards."""

from pathlib import Path

import typer

from dcpo_cli.errors import DcpoError


def score(
    rollouts: list[Path] = typer.Argument(..., help="Rollout Parquet shards."),
    out: Path = typer.Option(..., help="Scored Parquet file to write."),
) -> None:
    """Score responses with math-verify (or your own reward) and write one scored file."""
    raise DcpoError("dcpo score is not built yet (issue: rollout and score)")
