"""`dcpo tiny ...`: the built-in tiny model and arithmetic task."""

from pathlib import Path

import typer

from dcpo_cli.commands.help_format import DcpoCommand, DcpoGroup
from dcpo_cli.tiny.build import CONFIGS

SIZES = "; ".join(f"{name}: {config.about}" for name, config in CONFIGS.items())

app = typer.Typer(help="The built-in tiny model and arithmetic task (no downloads needed).",
                  no_args_is_help=True, cls=DcpoGroup)


@app.command("init", cls=DcpoCommand)
def init(
    directory: Path = typer.Argument(..., help="New directory for model/, train.parquet, "
                                     "test.parquet and summary.json."),
    seed: int = typer.Option(0, help="Seed for weights, data and the warm start."),
    size: str = typer.Option("default", help=f"The model's size ({SIZES})."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Train from scratch (2-3 minutes on "
                                 "2 cores) instead of copying the prebuilt seed-0 default "
                                 "model; other seeds and sizes are always trained."),
) -> None:
    """Write a tiny Qwen2 model, warm-started on an arithmetic task, plus its train/test prompts
    (seed 0 at the default size is copied, prebuilt, in seconds)."""
    from dcpo_cli.console import out
    from dcpo_cli.tiny.build import init_tiny

    result = init_tiny(directory, seed=seed, size=size, rebuild=rebuild)
    out.print(summary_table(result))


def summary_table(result):
    """The initial policy, per family and overall, as a rich table."""
    from rich.table import Table

    from dcpo_cli.tiny.build import TINY_MAX_NEW_TOKENS

    policy = result.summary["initial_policy"]
    table = Table(title=f"tiny init -> {result.directory}: initial policy on "
                        f"{result.summary['test_prompts']} test prompts x "
                        f"{policy['samples_per_prompt']} samples (temperature "
                        f"{policy['temperature']})")
    for column in ("family", "prompts", "accuracy", "boxed", "mixed prompts", "mean tokens"):
        table.add_column(column, justify="left" if column == "family" else "right")

    def add(name: str, f: dict, **style) -> None:
        table.add_row(name, str(f["prompts"]), f"{100 * f['accuracy']:.1f}%",
                      f"{100 * f['boxed_fraction']:.1f}%", f"{100 * f['mixed_fraction']:.1f}%",
                      f"{f['mean_response_tokens']:.1f}", **style)

    for family, figures in policy["by_family"].items():
        add(family.removeprefix("tiny-"), figures)
    add("all", policy, style="bold")
    how = "prebuilt (copied; --rebuild trains it)" if result.prebuilt else \
        f"{result.seconds:.0f} s"
    table.caption = (f"{result.summary['parameters'] / 1e6:.2f} M parameters, "
                     f"{result.summary['train_prompts']} train prompts, SFT loss "
                     f"{result.summary['sft']['final_loss']:.3f}, {how}; "
                     f"loop: --max-new-tokens {TINY_MAX_NEW_TOKENS}")
    return table
