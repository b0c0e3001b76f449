"""`dcpo report`: per-step curves and a table for one or more runs, or for a study."""

from pathlib import Path

import typer


def report(
    run_dirs: list[Path] = typer.Argument(
        ..., metavar="RUN_DIR", help="Run directory made by a training loop; several are "
        "overlaid. A study directory (`dcpo study`) gets the study report."),
    compare: list[Path] = typer.Option(
        [], "--compare", help="Run directories to overlay on the first (e.g. a GRPO run beside "
        "a DCPO run): `--compare RUN_B RUN_C` or repeat the option."),
    figure_path: Path | None = typer.Option(
        None, "--out", help="Figure to write (.png, .pdf, .svg). Default: RUN_DIR/report.png."),
    as_json: bool = typer.Option(False, "--json", help="Print the gathered data as JSON "
                                 "instead of tables (a study: its summary table)."),
    baseline: str | None = typer.Option(
        None, "--baseline", help="A study: the algorithm the others are compared with "
        "(default: grpo if the study has it, else its first)."),
    table_path: Path | None = typer.Option(
        None, "--table", help="A study: the summary table's file, .csv or .json (default: "
        "STUDY_DIR/report.csv)."),
) -> None:
    """Plot reward, clipping, utilization, length and KL per step into report.png; for a
    study, the algorithms' means over seeds with a min-max band, and the table of the
    paper's figures (mean ± std over seeds, ratio to --baseline)."""
    import json

    from dcpo_cli.console import err, out
    from dcpo_cli.errors import DcpoError
    from dcpo_cli.report.study import is_study

    if is_study(run_dirs[0]):
        if compare or len(run_dirs) > 1:
            raise DcpoError(f"{run_dirs[0]}: a study is reported on its own (no --compare)")
        return study_report(run_dirs[0], figure_path, table_path, baseline, as_json)
    if baseline is not None or table_path is not None:
        raise DcpoError(f"{run_dirs[0]}: --baseline and --table are for a study directory "
                        "(made by `dcpo study`)")
    from dcpo_cli.report.runs import evals_table, gather, metrics_table, plot_runs

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


def study_report(directory: Path, figure_path: Path | None, table_path: Path | None,
                 baseline: str | None, as_json: bool) -> None:
    import json

    from dcpo_cli.console import err, out
    from dcpo_cli.report.study import (
        gather_study,
        plot_study,
        summarize,
        summary_table,
        write_table,
    )

    data = gather_study(directory)
    summary = summarize(data, baseline)  # a bad --baseline stops here, before any file
    table = write_table(summary, table_path or directory / "report.csv")
    figure = plot_study(data, figure_path or directory / "report.png")
    if as_json:
        print(json.dumps({"figure": str(figure), "table": str(table), **summary}, indent=2))
        err.print(f"wrote {figure} and {table}", highlight=False)
        return
    out.print(summary_table(summary))
    if summary["missing"]:
        out.print(f"not started yet: {', '.join(summary['missing'])}", highlight=False)
    out.print(f"wrote {figure} and {table}", highlight=False)
