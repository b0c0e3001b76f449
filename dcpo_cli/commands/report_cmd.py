"""`dcpo report`: per-step curves and a table for one or more runs."""

from pathlib import Path

import typer

from dcpo_cli.errors import DcpoError


def report(
    run_dir: Path = typer.Argument(..., help="Run directory made by a training loop."),
) -> None:
    """Plot reward, clipping, utilization, length and KL per step into report.png."""
    raise DcpoError("dcpo report is not built yet (issue: the shell loop)")
