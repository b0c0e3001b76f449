"""`dcpo study`: several algorithms and seeds, one `dcpo run` each, side by side.

The command takes every option of `dcpo run` (its signature is `dcpo run`'s, read when this
module is imported, so an option added to `dcpo run` is one here too) besides its own; each
run gets them on its command line, with its `--algo` and `--seed`.
"""

import inspect
from pathlib import Path

import typer

from dcpo_cli.commands import run_cmd
from dcpo_cli.core.presets import PRESETS
from dcpo_cli.options import choices


def study(
    study_dir: Path = typer.Argument(..., help="Study directory: study.json, one dcpo run "
                                     "directory per algorithm and seed (<algo>-s<seed>/), "
                                     "logs/ and wall_seconds.json."),
    *,
    algo: list[str] | None = typer.Option(None, "--algo", help="An algorithm to run: "
                                          f"{choices(PRESETS)}. Repeatable; needed the "
                                          "first time (a re-run reads study.json)."),
    seeds: int | None = typer.Option(None, help="Seeds per algorithm: --seed, --seed + 1, "
                                     "... (default: 3)."),
    seed: int | None = typer.Option(None, help="The first seed (default: 0); each run's "
                                    "--seed (tiny model, prompt order, sampling, "
                                    "mini-batches)."),
    jobs: int = typer.Option(1, help="Runs at once (subprocesses); each gets cores / JOBS "
                             "torch threads unless OMP_NUM_THREADS is set."),
    **run_options,
) -> None:
    """Run each --algo with each seed, one `dcpo run` per pair in STUDY_DIR/<algo>-s<seed>/,
    JOBS at a time; re-run the same command to resume (finished runs are skipped). Every
    other option is `dcpo run`'s, given to each run. Then: `dcpo report STUDY_DIR`."""
    from rich.table import Table

    from dcpo_cli.console import out
    from dcpo_cli.errors import DcpoError
    from dcpo_cli.run.config import FLAGS
    from dcpo_cli.run.study import check_runs, execute, plan_study, python_command

    if jobs < 1:
        raise DcpoError(f"--jobs {jobs}: must be at least 1")
    plan = plan_study(study_dir, algo, seeds, seed, run_options)
    check_runs(plan, run_options.get("verbose", False))  # nothing starts unless all are good
    # options that are not settings (--verbose, --nproc-per-node, ...): this invocation's
    extra = {name: value for name, value in run_options.items()
             if name not in FLAGS and name != "set_"}

    def command(run) -> list[str]:
        return python_command(plan.run_dir(run), tokens({**plan.run_values(run), **extra}))

    outcomes = execute(plan, command, jobs=jobs,
                       processes_per_run=int(run_options.get("nproc_per_node") or 1))
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


# --- dcpo run's options, taken over --------------------------------------------------------

_OWN = inspect.signature(study)
_RUN = inspect.signature(run_cmd.run)
_TAKEN = ("run_dir", "algo", "seed")  # the study's own versions replace these
_PARAMETERS = [p for p in _OWN.parameters.values() if p.kind is not p.VAR_KEYWORD] + [
    p for name, p in _RUN.parameters.items() if name not in _TAKEN]
study.__signature__ = _OWN.replace(parameters=_PARAMETERS)
study.__annotations__ = {p.name: p.annotation for p in _PARAMETERS}


def _run_options() -> list:
    """The click options of `dcpo run` (names, flags, defaults), for its command lines."""
    app = typer.Typer(add_completion=False)
    app.command()(run_cmd.run)
    return [p for p in typer.main.get_command(app).params
            if getattr(p, "param_type_name", "") == "option"]


def tokens(values: dict) -> list[str]:
    """`dcpo run` command-line arguments for keyword values (None or the default: left
    out), from its click options, so any option it has is written the way it parses."""
    args: list[str] = []
    for option in _run_options():
        value = values.get(option.name)
        if value is None or value == option.default or (option.multiple and not value):
            continue
        if option.is_flag:
            args.append(option.opts[0] if value else option.secondary_opts[0])
        elif option.multiple:
            for item in value:
                args += [option.opts[0], str(item)]
        else:
            args += [option.opts[0], str(value)]
    return args
