"""`dcpo study`: several algorithms and seeds, one `dcpo run` each, side by side.

The command takes every settings flag of `dcpo run` (the same declarations,
`run_cmd.with_run_flags`) besides its own; each run's settings are written to its run.toml
before it starts, and each run is `dcpo run RUN_DIR` with no settings flags.
"""

from pathlib import Path

import typer

from dcpo_cli.commands.declared import panels
from dcpo_cli.commands.run_cmd import RUN_PANELS, given_values, with_run_flags
from dcpo_cli.options import ALGORITHMS, choices


def _study(
    study_dir: Path = typer.Argument(..., help="Study directory: study.json, one dcpo run "
                                     "directory per algorithm and seed (<algo>-s<seed>/), "
                                     "logs/ and wall_seconds.json."),
    *,
    algo: list[str] | None = typer.Option(None, "--algo", help="An algorithm to run: "
                                          f"{choices(ALGORITHMS)}. Repeatable; needed the "
                                          "first time (a re-run reads study.json)."),
    seeds: int | None = typer.Option(None, help="Seeds per algorithm: --seed, --seed + 1, "
                                     "... (default: 3)."),
    seed: int | None = typer.Option(None, help="The first seed (default: 0); each run's "
                                    "--seed (tiny model, prompt order, sampling, "
                                    "mini-batches)."),
    jobs: int = typer.Option(1, help="Runs at once (subprocesses); each gets cores / JOBS "
                             "torch threads unless OMP_NUM_THREADS is set."),
    set_: list[str] | None = typer.Option(None, "--set", metavar="SECTION.FIELD=VALUE",
                                          help="Any other setting of the runs' run.toml, "
                                          "e.g. train.weight_decay=0.0. Repeatable."),
    verbose: bool = typer.Option(False, "--verbose", rich_help_panel="Engine",
                                 help="Show the engines' own INFO logs (in the runs' logs)."),
    no_verify: bool = typer.Option(False, "--no-verify", rich_help_panel="Checkpointing",
                                   help="Load checkpoints without checking their weights' "
                                   "checksums."),
    **flags,
) -> None:
    """Run each --algo with each seed, one `dcpo run` per pair in STUDY_DIR/<algo>-s<seed>/,
    JOBS at a time; re-run the same command to resume (finished runs are skipped). Every
    other option is `dcpo run`'s, given to each run. Then: `dcpo report STUDY_DIR`."""
    from rich.table import Table

    from dcpo_cli.console import out
    from dcpo_cli.errors import DcpoError
    from dcpo_cli.run.study import check_runs, execute, plan_study

    if jobs < 1:
        raise DcpoError(f"--jobs must be at least 1 (got {jobs})")
    plan = plan_study(study_dir, algo, seeds, seed, given_values(flags), set_ or [])
    check_runs(plan, verbose)  # nothing is written or started unless every run is good
    passed = [*(["--verbose"] if verbose else []), *(["--no-verify"] if no_verify else [])]
    outcomes = execute(plan, passed, jobs=jobs)
    table = Table(title=f"dcpo study {study_dir}", title_justify="left")
    for name in ("run", "status", "steps", "wall s", "log"):
        table.add_column(name, justify="left" if name in ("run", "status", "log") else "right")
    for o in outcomes:
        table.add_row(o.run.name, o.status if o.code == 0 else f"failed (exit {o.code})",
                      str(o.steps), "" if o.seconds is None else f"{o.seconds:.0f}",
                      str(o.log or ""))
    out.print(table)
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        error = DcpoError(f"{len(failed)} of {len(outcomes)} runs failed: "
                          + ", ".join(f"{o.run.name} (see {o.log})" for o in failed))
        error.exit_code = 1
        raise error
    out.print(f"next: dcpo report {study_dir}", highlight=False)


study = panels(with_run_flags(_study, skip=("algo", "seed")), RUN_PANELS)
