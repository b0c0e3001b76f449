"""`dcpo score`: verify responses and attach rewards."""

from pathlib import Path

import typer

from dcpo_cli.commands.help_format import group
from dcpo_cli.options import DEFAULT_REWARD, REWARD_LEVELS, ScoreOptions

D = ScoreOptions()  # the defaults


def score(
    *,  # keyword-only: typer passes every option by name
    rollouts: list[Path] = typer.Argument(..., help="Rollout Parquet shards (or any Parquet "
                                          "file with prompt_id, response_text, answer)."),
    out: Path = typer.Option(..., help="Scored Parquet file to write."),
    workers: int | None = typer.Option(D.workers, help="Reward processes (default: all "
                                       "cores)."),
    timeout: float = typer.Option(D.timeout, help="Seconds allowed to score one response; "
                                  "slower ones count as wrong and are flagged."),
    wrong_reward: float = typer.Option(D.wrong_reward, help="Reward of a boxed but wrong "
                                       "answer (right is 1.0)."),
    no_answer_reward: float | None = typer.Option(
        D.no_answer_reward,
        help="Reward of a response with no parseable \\boxed{} answer (cut off ones "
        "included); default --wrong-reward. The official DCPO recipe: -1 (1 / 0 / -1). The "
        "scored file's reward_level column says which level each response got."),
    overlong_buffer: int = typer.Option(D.overlong_buffer, help="DAPO overlong shaping buffer "
                                        "in tokens (0: off); the max length comes from the "
                                        "rollouts."),
    max_length: int | None = typer.Option(D.max_length, help="Max response length for overlong "
                                          "shaping, for files without rollout metadata."),
    reward: str | None = typer.Option(
        D.reward, help=f"Your own reward, package.module:function (default: {DEFAULT_REWARD}), "
        "called as f(response_text, answer, row) in the worker pool. It returns the reward, "
        f"or a level ({', '.join(REWARD_LEVELS)}) that gets 1 / --wrong-reward / "
        "--no-answer-reward. A module in the current folder is found."),
) -> None:
    """Score responses with math-verify (or your own reward) and write one scored file."""
    from rich.table import Table

    from dcpo_cli.console import out as console
    from dcpo_cli.options import from_values
    from dcpo_cli.stages.score import run_score

    options = from_values(ScoreOptions, locals())
    s = run_score(rollouts, out, options)
    table = Table(title=f"{s.out} ({s.kind})", title_justify="left")
    for name in ("responses", "accuracy", "mean reward", "timeouts", "verifier errors",
                 "responses/s"):
        table.add_column(name, justify="right")
    table.add_row(str(s.responses), f"{s.accuracy:.1%}", f"{s.mean_reward:.4f}",
                  str(s.timeouts), str(s.errors), f"{s.responses_per_second:,.0f}")
    console.print(table)


# The panels of the command's --help (commands/help_format.py).
group(score, {
    "Rewards": ("wrong_reward", "no_answer_reward", "overlong_buffer", "max_length", "reward"),
})
