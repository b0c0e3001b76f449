"""The `dcpo` command line: one thin command per stage.

Only typer, rich and the standard library are imported here and in `dcpo_cli.commands`;
torch, transformers, vllm and math-verify are imported inside the commands that need them,
so `dcpo --help` stays instant.
"""

from __future__ import annotations

import os
import sys

import typer

from dcpo_cli import __version__
from dcpo_cli.commands import (
    eval_cmd,
    export_cmd,
    help_format,
    inspect_cmd,
    prepare_cmd,
    report_cmd,
    rollout_cmd,
    run_cmd,
    score_cmd,
    serve_cmd,
    study_cmd,
    tiny_cmd,
    train_step_cmd,
)
from dcpo_cli.errors import DcpoError, FieldError, first_line

app = typer.Typer(
    name="dcpo",
    help="Train language models with DCPO (Dynamic Clipping Policy Optimization), "
    "one inspectable Parquet stage at a time.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=help_format.DcpoGroup,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dcpo {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", help="Show the warnings and log lines of "
                                 "torch, transformers, datasets and vLLM (as DCPO_DEBUG=1 "
                                 "does); hidden otherwise."),
) -> None:
    """Train language models with DCPO, one inspectable Parquet stage at a time."""
    from dcpo_cli import quiet

    quiet.configure(verbose=verbose or None)  # before any command imports a library


app.command("prepare", cls=help_format.DcpoCommand)(prepare_cmd.prepare)
app.command("inspect", cls=help_format.DcpoCommand)(inspect_cmd.inspect)
app.add_typer(tiny_cmd.app, name="tiny")
app.command("rollout", cls=help_format.DcpoCommand)(rollout_cmd.rollout)
app.command("score", cls=help_format.DcpoCommand)(score_cmd.score)
app.command("train-step", cls=help_format.DcpoCommand)(train_step_cmd.train_step)
app.command("eval", cls=help_format.DcpoCommand)(eval_cmd.evaluate)
app.command("report", cls=help_format.DcpoCommand)(report_cmd.report)
app.command("export", cls=help_format.DcpoCommand)(export_cmd.export)
app.command("run", cls=help_format.DcpoCommand)(run_cmd.run)
app.command("serve", cls=help_format.DcpoCommand)(serve_cmd.serve)
app.command("study", cls=help_format.DcpoCommand)(study_cmd.study)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code; a DcpoError becomes one line on stderr and 2,
    any other failure one line and 1."""
    from dcpo_cli.console import err
    from dcpo_cli.parallel import launch

    launch.remember_argv(sys.argv[1:] if argv is None else argv)
    try:
        # not standalone, click returns the code of a `typer.Exit(code)` instead of exiting
        code = app(args=argv, prog_name="dcpo", standalone_mode=False)
    except DcpoError as exc:
        return _report_error(exc)
    except EXIT as exc:
        return exc.exit_code
    except CLICK_ERRORS as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help is already on screen
            return exc.exit_code
        # a bad option value or usage: one line, exit 2, before any work was done
        _print_error(exc.format_message().strip().splitlines()[0])
        return exc.exit_code
    except (ABORT, KeyboardInterrupt):
        err.print("aborted")
        return 130
    except Exception as exc:  # a bug or an unforeseen input: still one line, unless debugging
        if os.environ.get("DCPO_DEBUG"):
            raise
        if isinstance(exc, OSError) and exc.filename:
            message = f"{exc.filename}: {exc.strerror or exc}"
        else:
            message = (f"unexpected {type(exc).__name__}: {first_line(exc)} (set DCPO_DEBUG=1 "
                       "to see the traceback)")
        error_file = os.environ.get("DCPO_ERROR_FILE")
        if error_file and "RANK" in os.environ:  # the launcher reports the first failure
            with open(f"{error_file}.rank{os.environ['RANK']}", "w") as handle:
                handle.write(message + "\n")
        else:
            _print_error(message)
        return 1
    finally:
        _end_process_group()
    return code if isinstance(code, int) else 0


def _report_error(exc: DcpoError) -> int:
    """One line from rank 0 (every rank of a torchrun job finds the same bad input). Under
    `--nproc-per-node` the line goes to the launcher, which prints it and exits 2. A bad
    setting is named as the option that gives it (`FieldError`: --eps-low, not eps_low)."""
    if isinstance(exc, FieldError):
        exc = exc.as_flags()
    rank = os.environ.get("RANK", "0")
    error_file = os.environ.get("DCPO_ERROR_FILE")
    if error_file:
        if rank == "0":
            with open(error_file, "w") as handle:
                handle.write(str(exc) + "\n")
        return 0
    if rank == "0":
        _print_error(str(exc))
    return exc.exit_code


def _end_process_group() -> None:
    if "dcpo_cli.parallel.distributed" in sys.modules:  # torch is loaded only if it was used
        sys.modules["dcpo_cli.parallel.distributed"].shutdown()


def _click_exceptions() -> tuple[tuple[type[Exception], ...], type[Exception], type[Exception]]:
    """(usage errors, Exit, Abort) of the click typer runs on: the copy typer >= 0.2x vendors
    (typer._click; then `import click`, 20 ms of `dcpo --help`, is not needed), else click."""
    try:
        from typer._click.exceptions import ClickException
    except ImportError:  # older typer, on click itself (already imported by typer)
        import click

        return (click.ClickException,), click.exceptions.Exit, click.exceptions.Abort
    return (ClickException,), typer.Exit, typer.Abort


CLICK_ERRORS, EXIT, ABORT = _click_exceptions()


def _print_error(message: str) -> None:
    from rich.markup import escape

    from dcpo_cli.console import err

    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True,
              soft_wrap=True)


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
