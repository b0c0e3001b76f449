"""The one JSONL reader (problem sets for `prepare`, metrics logs for `report`)."""

from __future__ import annotations

import json
from typing import Any

from dcpo_cli.errors import DcpoError


def parse_jsonl(text: str, name: str) -> list[dict[str, Any]]:
    """One JSON object per line; blank lines are skipped, any other line is an error naming
    `name` and the line number."""
    records = []
    # split("\n"), not splitlines(): U+2028 and friends are legal inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DcpoError(f"{name} line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DcpoError(f"{name} line {number}: expected a JSON object, "
                            f"got {type(record).__name__}")
        records.append(record)
    return records
