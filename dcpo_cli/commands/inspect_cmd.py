"""`dcpo inspect`: look inside any dcpo file."""

from pathlib import Path

import typer


def inspect(
    file: Path = typer.Argument(..., help="A dcpo Parquet file (or any Parquet), or a state file."),
    rows: int = typer.Option(5, "--rows", "-n", help="How many rows to show."),
    columns: str | None = typer.Option(None, help="Comma-separated columns to show."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead."),
) -> None:
    """Show a file's kind, rows, schema, metadata, column statistics and first rows."""
    import json

    from dcpo_cli.console import out
    from dcpo_cli.inspect import describe, render

    wanted = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    info = describe(file, rows=rows, columns=wanted)
    if as_json:
        print(json.dumps(info, default=str, indent=2))
    else:
        render(info, out)
