"""`dcpo report`: per-step curves and a table for one or more runs."""

from pathlib import Path

import typer


def report(
    run_dirs: list[Path] = typer.Argument(
        ..., metavar="RUN_DIR", help="Run directory made by a training loop; several are "
        "overlaid."),
    compare: list[Path] = typer.Option(
        [], "--compare", help="Run directories to overlay on the first (e.g. a GRPO run beside "
        "a DCPO run): `--compare RUN_B RUN_C` or repeat the option."),
    figure_path: Path | None = typer.Option(
        None, "--out", help="Figure to write (.png, .pdf, .svg). Default: RUN_DIR/report.png."),
    as_json: bool = typer.Option(False, "--json", help="Print the gathered data as JSON "
                                 "instead of tables."),
) -> None:
    """Plot reward, clipping, utilization, length and KL per step into report.png."""
    import json

    from dcpo_cli.console import err, out
    from dcpo_cli.stages.report import evals_table, gather, metrics_table, plot_runs

    # `A --compare B C` parses as run_dirs [A, C], compare [B]: put them back in typed order.
    runs = gather([run_dirs[0], *compare, *run_dirs[1:]])
    figure = plot_runs(runs, figure_path or run_dirs[0] / "report.png")
    if as_json:
        print(json.dumps({"figure": str(figure), "runs": runs}, indent=2))
        err.print(f"wrote {figure}", highlight=False)
        return
    for run in runs:
        out.print(metrics_table(run))
    table = evals_table(runs)
    if table is not None:
        out.print(table)
    out.print(f"wrote {figure}", highlight=False)
