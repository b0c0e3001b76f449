"""`dcpo inspect`: what a dcpo file holds, for people (rich tables) and machines (--json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dcpo_cli.errors import DcpoError
from dcpo_cli.files import contracts


def column_stats(table: pa.Table) -> dict[str, dict[str, float]]:
    """mean/min/max of numeric and boolean columns, and of the lengths of list/string columns."""
    stats: dict[str, dict[str, float]] = {}
    for name in table.column_names:
        column = table.column(name)
        kind = column.type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            values, label = pc.list_value_length(column), f"{name} (length)"
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            values, label = pc.utf8_length(column), f"{name} (chars)"
        elif pa.types.is_boolean(kind):
            values, label = pc.cast(column, pa.int8()), name
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
            values, label = column, name
        else:
            continue
        if values.null_count == len(values):
            continue
        minmax = pc.min_max(values).as_py()
        stats[label] = {"mean": pc.mean(values).as_py(), "min": minmax["min"],
                        "max": minmax["max"]}
    return stats


def _cell(value: Any, width: int = 60) -> str:
    if isinstance(value, list) and value and isinstance(value[0], dict) and "content" in value[0]:
        text = " | ".join(f"{m.get('role')}: {m.get('content')}" for m in value)
    elif isinstance(value, list) and len(value) > 8:
        head = ", ".join(_short_number(v) for v in value[:6])
        text = f"[{head}, ... ({len(value)} items)]"
    elif isinstance(value, float):
        text = _short_number(value)
    else:
        text = str(value)
    text = text.replace("\n", "⏎")
    return text if len(text) <= width else text[: width - 1] + "…"


def _short_number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def describe_parquet(path: Path, rows: int, columns: list[str] | None) -> dict[str, Any]:
    table = contracts.read_parquet(path)
    metadata = contracts.read_metadata(path)
    if columns:
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise DcpoError(f"{path.name}: column '{missing[0]}' is missing")
    shown = table.select(columns) if columns else table
    return {
        "file": str(path),
        "kind": contracts.detect_kind(table, metadata),
        "rows": table.num_rows,
        "schema": {f.name: str(f.type) for f in table.schema},
        "metadata": metadata,
        "stats": column_stats(shown),
        "head": shown.slice(0, rows).to_pylist(),
    }


def describe_json(path: Path, rows: int) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DcpoError(f"{path.name}: not a readable JSON file ({exc})") from None
    if isinstance(data, dict) and data.get("format") == "dcpo-sas-state":
        prompts = data.get("prompts", {})
        head = [{"prompt_id": pid, **entry} for pid, entry in list(prompts.items())[:rows]]
        times = [entry.get("times", 0) for entry in prompts.values()]
        return {
            "file": str(path), "kind": "sas_state", "rows": len(prompts),
            "metadata": {k: v for k, v in data.items() if k != "prompts"},
            "stats": {"times": {"mean": sum(times) / len(times), "min": min(times),
                                "max": max(times)}} if times else {},
            "head": head,
        }
    return {"file": str(path), "kind": "json", "rows": None, "metadata": {}, "stats": {},
            "head": data}


def describe(path: str | Path, rows: int = 5, columns: list[str] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise DcpoError(f"{path}: no such file")
    if path.is_dir():
        raise DcpoError(f"{path}: is a directory; inspect one of its files")
    if path.suffix.lower() == ".json":
        return describe_json(path, rows)
    return describe_parquet(path, rows, columns)


def render(info: dict[str, Any], console) -> None:
    from rich.table import Table

    rows = "" if info["rows"] is None else f", {info['rows']} rows"
    console.print(f"[bold]{info['file']}[/]: {info['kind']}{rows}", highlight=False)
    meta = info.get("metadata") or {}
    if meta:
        table = Table(title="metadata", show_header=False, title_justify="left")
        for key, value in meta.items():
            text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
            table.add_row(key, _cell(text, 100))
        console.print(table)
    if info.get("schema"):
        table = Table(title="schema", show_header=False, title_justify="left")
        for name, kind in info["schema"].items():
            table.add_row(name, kind)
        console.print(table)
    if info.get("stats"):
        table = Table(title="statistics", title_justify="left")
        for header in ("column", "mean", "min", "max"):
            table.add_column(header, justify="left" if header == "column" else "right")
        for name, stat in info["stats"].items():
            table.add_row(name, *(_short_number(float(stat[k])) for k in ("mean", "min", "max")))
        console.print(table)
    head = info.get("head")
    if isinstance(head, list) and head and isinstance(head[0], dict):
        table = Table(title=f"first {len(head)} rows", title_justify="left")
        for name in head[0]:
            table.add_column(name, overflow="fold")
        for row in head:
            table.add_row(*(_cell(row.get(name)) for name in head[0]))
        console.print(table)
    elif head is not None and info["kind"] == "json":
        console.print_json(json.dumps(head))
