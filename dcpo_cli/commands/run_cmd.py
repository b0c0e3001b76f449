"""`dcpo run`: the shell loop in one process, models kept loaded between stages.

Its flags are the [loop] and [launch] settings and the stage settings of `run/config.py`'s
SHORTCUTS, each typed and explained by its declaration (options.py); every flag defaults
to None, meaning "not given": the first run takes the shell loop's default (shown in the
help), a re-run the value in RUN_DIR/run.toml.
"""

import dataclasses
import inspect
import typing
from pathlib import Path

import typer

from dcpo_cli.commands.declared import panels, typer_option
from dcpo_cli.fields import hints
from dcpo_cli.run.config import FLAGS, SECTIONS, default_config, flag_declaration

RUN_PANELS = ("Sampling", "Training", "Evaluation", "Engine", "LoRA", "Distributed",
              "Checkpointing")


def run_flag_parameters(skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """One parameter per run flag (FLAGS), default None, its help ending in the default a
    first run takes."""
    defaults = default_config()
    params = []
    for flag in FLAGS:
        if flag in skip:
            continue
        field, spec = flag_declaration(flag)
        section, name = FLAGS[flag][0]
        hint = spec.cli_type or hints(SECTIONS[section])[field.name]
        default = defaults[section][name]
        help_text = spec.help if default in (None, [], ()) else \
            f"{spec.help.rstrip('.')} (default: {_shown(default)})."
        spec = dataclasses.replace(spec, help=help_text, cli_type=None)
        if type(None) not in typing.get_args(hint):
            hint = hint | None
        params.append(typer_option(flag, hint, spec, None))
    return params


def _shown(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def given_values(values: dict) -> dict:
    """The run flags among a command's keyword values that were given (not None)."""
    from dcpo_cli.run.config import given_flags

    return given_flags({name: values.get(name) for name in FLAGS})


def _run(
    run_dir: Path = typer.Argument(..., help="Run directory: steps/, ckpt/, eval/, state.json, "
                                   "metrics.jsonl and run.toml, as examples/tiny_loop.sh "
                                   "lays them out."),
    *,
    set_: list[str] | None = typer.Option(None, "--set", metavar="SECTION.FIELD=VALUE",
                                          help="Any other setting of run.toml, e.g. "
                                          "train.weight_decay=0.0 or engine.enforce_eager="
                                          "true (VALUE read as JSON where it parses). "
                                          "Repeatable."),
    verbose: bool = typer.Option(False, "--verbose", rich_help_panel="Engine",
                                 help="Show the engine's own INFO logs and load progress bars "
                                 "(by default only its warnings and errors)."),
    no_verify: bool = typer.Option(False, "--no-verify", rich_help_panel="Checkpointing",
                                   help="Load checkpoints without checking their weights "
                                   "against the checksums recorded when they were written."),
    node_rank: int = typer.Option(0, help="With --nnodes: this node's index, 0 .. nnodes-1.",
                                  rich_help_panel="Distributed"),
    master_addr: str | None = typer.Option(None, help="With --nnodes: address of the node "
                                           "with --node-rank 0.",
                                           rich_help_panel="Distributed"),
    master_port: int | None = typer.Option(None, help="With --nnodes: a free port there "
                                           "(default 29500).", rich_help_panel="Distributed"),
    **flags,
) -> None:
    """Run rollout -> score -> train-step for each step (and eval) in one process, with the
    same files as examples/tiny_loop.sh; re-run the same command to resume."""
    import os

    from dcpo_cli.commands.shared import apply_load_options
    from dcpo_cli.options import LoadOptions
    from dcpo_cli.run.start import Invocation, plan_run, start_run

    apply_load_options(LoadOptions(no_verify))
    plan = plan_run(run_dir, given_values(flags), set_ or [],
                    Invocation(verbose, node_rank, master_addr, master_port))
    result = start_run(plan)
    if isinstance(result, int):
        raise typer.Exit(result)
    if os.environ.get("RANK", "0") == "0":
        print_timings(run_dir, result)


def print_timings(run_dir: Path, timings: list) -> None:
    from rich.table import Table

    from dcpo_cli.console import out

    table = Table(title=f"dcpo run {run_dir}", title_justify="left")
    for name in ("step", "wall s", "generate s", "score s", "update s", "wall / work"):
        table.add_column(name, justify="right")
    for t in timings:
        cells = [f"{x:.2f}" if x is not None else "skipped" for x in (t.generate, t.score,
                                                                     t.train)]
        ratio = f"{t.wall / t.work:.2f}" if t.work and None not in (t.generate, t.score,
                                                                   t.train) else ""
        table.add_row(str(t.step), f"{t.wall:.2f}", *cells, ratio)
    out.print(table)


def with_run_flags(function, skip: tuple[str, ...] = ()):
    """`function`'s own parameters (its **flags left out) and then every run flag."""
    own = [p for p in inspect.signature(function).parameters.values()
           if p.kind is not p.VAR_KEYWORD]
    arguments = [p for p in own if p.kind is not p.KEYWORD_ONLY]
    keywords = [p for p in own if p.kind is p.KEYWORD_ONLY]
    parameters = arguments + run_flag_parameters(skip) + keywords
    function.__signature__ = inspect.Signature(parameters)
    function.__annotations__ = {p.name: p.annotation for p in parameters}
    return function


run = panels(with_run_flags(_run), RUN_PANELS)
