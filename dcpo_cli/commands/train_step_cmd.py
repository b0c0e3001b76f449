"""`dcpo train-step`: one policy update from scored shards."""

from pathlib import Path

import typer

from dcpo_cli.errors import DcpoError


def train_step(
    model: Path = typer.Option(..., help="Policy: a model directory or a train-step checkpoint."),
    scored: list[Path] = typer.Option(..., help="Scored Parquet shard(s)."),
    state: Path = typer.Option(..., help="SAS state file (created if absent)."),
    out: Path = typer.Option(..., help="Checkpoint directory to write."),
) -> None:
    """Apply one DCPO (or GRPO/DAPO/GSPO) update and write a checkpoint."""
    raise DcpoError("dcpo train-step is not built yet (issue: train-step)")
