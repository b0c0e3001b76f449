"""`dcpo inspect`: look inside any dcpo file."""

from pathlib import Path

import typer


def inspect(
    file: Path = typer.Argument(..., help="A dcpo Parquet file (or any Parquet), or a state file."),
    rows: int = typer.Option(5, "--rows", "-n", help="How many rows to show."),
    columns: str | None = typer.Option(None, help="Comma-separated columns to show."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead."),
    metadata: str | None = typer.Option(None, "--metadata", help="Print only this key of the "
                                        "file's dcpo metadata (e.g. mixed_groups of a scored "
                                        "file), as JSON, for scripts."),
) -> None:
    """Show a file's kind, rows, schema, metadata, column statistics and first rows."""
    import json

    if metadata is not None:
        from dcpo_cli.errors import DcpoError
        from dcpo_cli.files import contracts

        values = contracts.read_metadata(file)
        if metadata not in values:
            raise DcpoError(f"{file}: no metadata key {metadata!r} (it has "
                            f"{', '.join(sorted(values)) or 'none'})")
        print(json.dumps(values[metadata], default=str))
        return

    from dcpo_cli.console import out
    from dcpo_cli.stages.inspect import describe, render

    wanted = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    info = describe(file, rows=rows, columns=wanted)
    if as_json:
        print(json.dumps(info, default=str, indent=2))
    else:
        render(info, out)
