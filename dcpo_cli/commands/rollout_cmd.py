"""`dcpo rollout`: sample responses for one step's prompts."""

from pathlib import Path

import typer

from dcpo_cli.errors import DcpoError


def rollout(
    model: Path = typer.Option(..., help="Hugging Face model directory."),
    prompts: Path = typer.Option(..., help="Prompts Parquet file (from `dcpo prepare`)."),
    step: int = typer.Option(..., help="Training step; selects the step's slice of prompts."),
    out: Path = typer.Option(..., help="Rollouts Parquet file to write."),
) -> None:
    """Generate --n responses for each prompt of step N's batch."""
    raise DcpoError("dcpo rollout is not built yet (issue: rollout and score)")
