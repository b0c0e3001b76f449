"""`--help` as dcpo prints it: every option's full name, at any terminal width.

typer's rich help puts names, negative names, types and help in one table, and rich
shortens every column once they do not fit, so at 80 columns `--keep-training-state` became
`--keep-training-…`. Here the names column is never shortened (each name on its own line,
its value name beside it) and the help column takes the rest of the width; where even that
leaves too little room, the help goes under the names. Options are grouped by their
`rich_help_panel` (typer's own setting), in order of first appearance after the default
"Options" panel. The help text is plain text, not rich markup (`org/name[@revision]`
stays as written). Only rich and the standard library: `dcpo --help` stays fast.
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable

import typer.core

OPTIONS_PANEL = "Options"
ARGUMENTS_PANEL = "Arguments"
COMMANDS_PANEL = "Commands"
MIN_HELP_WIDTH = 24  # narrower than this, a panel puts each option's help under its names
_TYPE_NAMES = {"str": "TEXT", "text": "TEXT", "integer": "INT", "int": "INT", "float": "FLOAT",
               "path": "PATH", "bool": "", "boolean": ""}


def group(function: Callable, panels: dict[str, tuple[str, ...]]) -> Callable:
    """Put a command's options into help panels ({title: parameter names}); the others stay
    in "Options". Sets typer's own `rich_help_panel` on each option's declaration."""
    params = inspect.signature(function).parameters
    function.dcpo_panel_order = tuple(panels)  # the help shows them in this order
    for title, names in panels.items():
        for name in names:
            params[name].default.rich_help_panel = title
    return function


class DcpoCommand(typer.core.TyperCommand):
    def format_help(self, ctx, formatter) -> None:
        render_help(self, ctx)


class DcpoGroup(typer.core.TyperGroup):
    def format_help(self, ctx, formatter) -> None:
        render_help(self, ctx)


def paragraphs(text: str | None) -> list[str]:
    """A docstring or help string as paragraphs, each on one line (blank lines split them)."""
    if not text:
        return []
    blocks = re.split(r"\n\s*\n", text.strip())
    return [" ".join(line.strip() for line in block.splitlines()) for block in blocks]


def value_name(param, ctx) -> str:
    """What follows an option's name: its metavar, else its type (INT, FLOAT, PATH, TEXT);
    nothing for a flag."""
    if param.metavar:
        return param.metavar
    if getattr(param, "is_flag", False):
        return ""
    name = getattr(getattr(param, "type", None), "name", None)  # click's types (older typer)
    if name is None and hasattr(param, "display_type_rich"):
        name = (param.display_type_rich(ctx=ctx) or "").strip("<>")
    name = re.sub(r"^list\[(.*)\]$", r"\1", name or "value")
    return _TYPE_NAMES.get(name.lower(), name.upper())


def argument_name(param) -> str:
    name = param.metavar or param.name.upper()
    return f"{name}..." if param.nargs == -1 else name


def default_text(param) -> str | None:
    """The `[default: ...]` shown after an option's help, or None."""
    if getattr(param, "show_default", True) is False or param.required:
        return None
    default = param.default
    if callable(default):
        return None
    if getattr(param, "is_flag", False):
        if not param.secondary_opts or default is None:
            return None  # an on/off flag is off unless given
        return (param.opts if default else param.secondary_opts)[-1]
    if default is None or default == [] or default == ():
        return None
    if isinstance(default, list | tuple):
        return ", ".join(map(str, default))
    return str(getattr(default, "value", default))


def option_help(param) -> str:
    text = " ".join(paragraphs(param.help))
    if param.required:
        return f"{text} [required]".strip()
    default = default_text(param)
    return f"{text} [default: {default}]".strip() if default is not None else text


def name_lines(param, ctx) -> list[tuple[str, str]]:
    """(names, value name) per line: `-o, --out PATH`; a flag's negative name on its own line."""
    if isinstance(param, typer.core.TyperArgument):
        return [(argument_name(param), "")]
    value = value_name(param, ctx)
    lines = [(", ".join(param.opts), value)]
    lines += [(name, "") for name in param.secondary_opts]
    return lines


def panels(command, ctx) -> list[tuple[str, list[tuple[list[tuple[str, str]], str]]]]:
    """[(panel title, [(name lines, help), ...]), ...]: arguments, then the options panels."""
    grouped: dict[str, list] = {ARGUMENTS_PANEL: [], OPTIONS_PANEL: []}
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        is_argument = isinstance(param, typer.core.TyperArgument)
        title = getattr(param, "rich_help_panel", None) or (
            ARGUMENTS_PANEL if is_argument else OPTIONS_PANEL)
        grouped.setdefault(title, []).append((name_lines(param, ctx), option_help(param)))
    if isinstance(command, typer.core.TyperGroup):
        rows = []
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                rows.append(([(name, "")], (paragraphs(sub.help) or [""])[0]))
        grouped[COMMANDS_PANEL] = rows
    order = (ARGUMENTS_PANEL, OPTIONS_PANEL,
             *getattr(command.callback, "dcpo_panel_order", ()))
    titles = sorted(grouped, key=lambda t: order.index(t) if t in order else len(order))
    return [(title, grouped[title]) for title in titles if grouped[title]]


def usage(command, ctx) -> str:
    pieces = [ctx.command_path]
    params = [p for p in command.get_params(ctx) if not getattr(p, "hidden", False)]
    if any(not isinstance(p, typer.core.TyperArgument) for p in params):
        pieces.append("[OPTIONS]")
    for param in params:
        if isinstance(param, typer.core.TyperArgument):
            name = argument_name(param)
            pieces.append(name if param.required else f"[{name}]")
    if isinstance(command, typer.core.TyperGroup):
        pieces.append("COMMAND [ARGS]...")
    return "Usage: " + " ".join(pieces)


def render_help(command, ctx, file=None) -> None:
    """Print `command`'s help to stdout (or `file`), as wide as the terminal (or COLUMNS)."""
    from rich.console import Console, Group
    from rich.padding import Padding
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = Console(file=file or sys.stdout, highlight=False)
    console.print(Padding(Text(usage(command, ctx), style="bold"), (1, 1, 1, 1)))
    for paragraph in paragraphs(command.help):
        console.print(Padding(Text(paragraph), (0, 1, 1, 1)))
    inner = console.width - 4  # the panel's border and padding
    for title, rows in panels(command, ctx):
        names = [[Text.assemble((n, "bold cyan"), (f" {v}" if v else "", "yellow"))
                  for n, v in lines] for lines, _ in rows]
        widest = max(cell.cell_len for cells in names for cell in cells)
        side_by_side = inner - widest - 2 >= MIN_HELP_WIDTH
        if side_by_side:
            body = Table(box=None, show_header=False, padding=(0, 2, 0, 0), pad_edge=False,
                         expand=True)
            body.add_column(no_wrap=True, width=widest)
            body.add_column(ratio=1)
            for cells, (_, help_text) in zip(names, rows, strict=True):
                body.add_row(Text("\n").join(cells), _help_cell(help_text))
        else:  # too narrow for two columns: the help under the names
            parts = []
            for cells, (_, help_text) in zip(names, rows, strict=True):
                parts += cells
                if help_text:
                    parts.append(Padding(_help_cell(help_text), (0, 0, 0, 4)))
            body = Group(*parts)
        console.print(Panel(body, title=title, title_align="left", border_style="dim"))


def _help_cell(text: str):
    from rich.text import Text

    cell = Text(text, overflow="fold")  # a word wider than the column wraps, never cut
    for tag in re.finditer(r"\[(default: .*|required)\]$", text):
        cell.stylize("red" if tag.group(1) == "required" else "dim", tag.start())
    return cell
