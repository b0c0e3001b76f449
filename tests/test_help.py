"""`dcpo ... --help` as a newcomer reads it: in a 60- or 80-column terminal, or piped to a
file or `less` (COLUMNS set, stdout a pipe), every option's full name shows, unbroken, in
the names column of its panel, and no line is wider than the terminal."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
import typer
from conftest import REPO

from dcpo_cli.cli import app
from dcpo_cli.commands import help_format


def command_tree():
    """[(path, click command, context)] for the root, every command and every subcommand
    (`tiny init`), found from the app itself so a new command is covered too."""
    import typer.main

    root = typer.main.get_command(app)
    found, todo = [], [((), root, root.make_context("dcpo", ["--help"], resilient_parsing=True))]
    while todo:
        path, command, ctx = todo.pop(0)
        found.append((path, command, ctx))
        if isinstance(command, typer.core.TyperGroup):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                sub_ctx = sub.make_context(name, [], parent=ctx, resilient_parsing=True)
                todo.append(((*path, name), sub, sub_ctx))
    return found


TREE = command_tree()


def expected_names(command, ctx) -> set[str]:
    """Every name a user may type: options (and their negative names, short aliases),
    arguments' metavars, subcommands."""
    names = set()
    for param in command.get_params(ctx):
        if isinstance(param, typer.core.TyperArgument):
            names.add(help_format.argument_name(param))
        else:
            names |= set(param.opts) | set(param.secondary_opts)
    if isinstance(command, typer.core.TyperGroup):
        names |= set(command.list_commands(ctx))
    return names


def names_column(text: str) -> set[str]:
    """The tokens of the names column: on each panel line, what comes before the first
    two-space gap, split at ", " and " " (`-o, --out PATH`)."""
    tokens = set()
    for line in text.splitlines():
        if line.startswith("│ ") and not line.startswith("│  "):
            cell = line[2:].split("  ")[0].rstrip("│ ")
            tokens |= set(re.split(r",? ", cell))
    return tokens


def help_text(path: tuple[str, ...], columns: int) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORCE_COLOR", "TERMINAL_WIDTH", "LINES")}
    env["COLUMNS"] = str(columns)
    proc = subprocess.run([sys.executable, "-m", "dcpo_cli", *path, "--help"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout


@pytest.mark.parametrize("columns", [60, 80])
@pytest.mark.parametrize("path", [path for path, _, _ in TREE], ids=lambda p: " ".join(p) or "dcpo")
def test_help_shows_every_name_unbroken(path, columns):
    command, ctx = next((c, x) for p, c, x in TREE if p == path)
    text = help_text(path, columns)
    assert "\x1b[" not in text  # piped: no colour codes
    assert "…" not in text  # nothing cut short, in the names or the help
    assert max(len(line) for line in text.splitlines()) <= columns
    missing = expected_names(command, ctx) - names_column(text)
    assert missing == set(), text


def test_the_names_are_found_by_the_check():
    """The check above could pass vacuously if the names column were never read: it finds
    the long names train-step used to cut, and misses a name that is not there."""
    tokens = names_column(help_text(("train-step",), 80))
    assert {"--keep-training-state", "--drop-uniform-groups", "--keep-uniform-groups",
            "--rollout-correction-cap", "--no-gradient-checkpointing"} <= tokens
    assert "--keep-training-…" not in tokens and "--nope" not in tokens


def test_options_are_grouped_into_panels():
    text = help_text(("train-step",), 80)
    titles = re.findall(r"^╭─ (.+?) ─", text, flags=re.M)
    assert titles == ["Options", "Algorithm", "KL and sampler mismatch", "Optimization",
                      "LoRA", "Checkpointing", "Distributed"]
    engine = help_text(("rollout",), 80)
    assert re.findall(r"^╭─ (.+?) ─", engine, flags=re.M) == ["Options", "Sampling", "Engine",
                                                                "Checkpointing"]


def test_help_text_is_plain_text_not_markup():
    """`org/name[@revision]` was eaten as rich markup by the old help."""
    assert "org/name[@revision]" in help_text(("rollout",), 80)


def test_a_narrow_terminal_puts_the_help_under_the_names(monkeypatch):
    """40 columns are too narrow for two columns: each option's help goes under its names,
    which stay whole (rendered in-process, which is what the subprocess runs)."""
    monkeypatch.setenv("COLUMNS", "40")
    for _, command, ctx in TREE:
        buffer = io.StringIO()
        help_format.render_help(command, ctx, file=buffer)
        text = buffer.getvalue()
        assert max(len(line) for line in text.splitlines()) <= 40
        assert expected_names(command, ctx) <= names_column(text), text
    assert re.search(r"^│     \S", text, flags=re.M)  # the help, indented under its names
