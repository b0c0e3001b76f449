"""`dcpo score`: verify responses and attach rewards."""

from pathlib import Path

import typer

from dcpo_cli.commands.declared import command, panels
from dcpo_cli.options import ScoreOptions


def _score(
    rollouts: list[Path] = typer.Argument(..., help="Rollout Parquet shards (or any Parquet "
                                          "file with prompt_id, response_text, answer)."),
    *,
    out: Path = typer.Option(..., help="Scored Parquet file to write."),
    options: ScoreOptions,
) -> None:
    """Score responses with math-verify (or your own reward) and write one scored file."""
    from rich.table import Table

    from dcpo_cli.console import out as console
    from dcpo_cli.stages.score import run_score

    s = run_score(rollouts, out, options)
    table = Table(title=f"{s.out} ({s.kind})", title_justify="left")
    for name in ("responses", "accuracy", "mean reward", "timeouts", "verifier errors",
                 "responses/s"):
        table.add_column(name, justify="right")
    table.add_row(str(s.responses), f"{s.accuracy:.1%}", f"{s.mean_reward:.4f}",
                  str(s.timeouts), str(s.errors), f"{s.responses_per_second:,.0f}")
    console.print(table)


score = panels(command(_score, options=ScoreOptions), ("Rewards",))
