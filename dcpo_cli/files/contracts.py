"""The Parquet file contracts of docs/design.md section 2: schemas, validation, atomic
writes, metadata.

Every stage reads through `read_table(path, kind)` and writes through `write_table(...)`, so
there is exactly one definition of what each file holds. Problems are reported as a
`DcpoError` whose message names the file and the first problem found.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from dcpo_cli import __version__, options
from dcpo_cli.errors import DcpoError, first_line

METADATA_KEY = b"dcpo"

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))

# Column -> Arrow type. `None` type means "string or chat messages" (the prompt column).
PROMPT_COLUMNS: dict[str, pa.DataType | None] = {
    "prompt_id": pa.string(),
    "prompt": None,
    "answer": pa.string(),
}
ROLLOUT_COLUMNS: dict[str, pa.DataType | None] = {
    "step": pa.int64(),
    "prompt_id": pa.string(),
    "sample_index": pa.int64(),
    "prompt_text": pa.string(),
    "prompt_token_ids": pa.list_(pa.int64()),
    "response_text": pa.string(),
    "response_token_ids": pa.list_(pa.int64()),
    "response_logprobs": pa.list_(pa.float32()),
    "finish_reason": pa.string(),
    "answer": pa.string(),
}
SCORED_COLUMNS: dict[str, pa.DataType | None] = {
    **ROLLOUT_COLUMNS,
    "reward": pa.float64(),
    "correct": pa.bool_(),
    "extracted_answer": pa.string(),
}
# Written by `dcpo score` beside the required columns, but not required by train-step (scored
# files from other tools, or older ones, lack it): which reward level each response got.
REWARD_LEVEL_COLUMN = "reward_level"
REWARD_LEVELS = options.REWARD_LEVELS
TRAIN_RECORD_COLUMNS: dict[str, pa.DataType | None] = {
    "step": pa.int64(),
    "prompt_id": pa.string(),
    "sample_index": pa.int64(),
    "reward": pa.float64(),
    "advantage": pa.float64(),
    "response_tokens": pa.int64(),
    "clipped_tokens": pa.int64(),
    "old_logprob_mean": pa.float64(),
    "new_logprob_mean": pa.float64(),
    # mean rollout-correction weight over the response's tokens (1 without a correction)
    "rollout_weight_mean": pa.float64(),
}
# Written by train-step beside the required columns (older records lack it): how many train
# steps the policy that sampled the response lags --model; null when the rollouts do not
# record their sampling policy.
STALENESS_COLUMN = "staleness"
EVAL_SAMPLE_COLUMNS: dict[str, pa.DataType | None] = {
    "prompt_id": pa.string(),
    "sample_index": pa.int64(),
    "greedy": pa.bool_(),
    "response_text": pa.string(),
    "extracted_answer": pa.string(),
    "correct": pa.bool_(),
    "response_tokens": pa.int64(),
    "finish_reason": pa.string(),
}

# Required columns per file kind. Optional columns (source, flags) may be present as well.
CONTRACTS: dict[str, dict[str, pa.DataType | None]] = {
    "prompts": PROMPT_COLUMNS,
    "rollouts": ROLLOUT_COLUMNS,
    "scored": SCORED_COLUMNS,
    "train_records": TRAIN_RECORD_COLUMNS,
    "eval_samples": EVAL_SAMPLE_COLUMNS,
}

# What `dcpo score` needs at the least: generations made by other tools can be scored too.
SCOREABLE_COLUMNS: dict[str, pa.DataType | None] = {
    "prompt_id": pa.string(),
    "response_text": pa.string(),
    "answer": pa.string(),
}


def _compatible(actual: pa.DataType, expected: pa.DataType | None) -> bool:
    if expected is None:  # the prompt column: plain text or chat messages
        return pa.types.is_string(actual) or pa.types.is_large_string(actual) or (
            pa.types.is_list(actual) and pa.types.is_struct(actual.value_type)
            and {"role", "content"} <= {f.name for f in actual.value_type}
        )
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual) or pa.types.is_integer(actual)
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _compatible(
            actual.value_type, expected.value_type
        )
    return actual.equals(expected)


def _type_name(expected: pa.DataType | None) -> str:
    return "string or list<struct<role, content>>" if expected is None else str(expected)


def validate(table: pa.Table, kind: str, path: str | Path,
             columns: dict[str, pa.DataType | None] | None = None) -> None:
    """Raise DcpoError naming the file and the first column that breaks the contract."""
    name = Path(path).name
    contract = columns if columns is not None else CONTRACTS[kind]
    for column, expected in contract.items():
        if column not in table.column_names:
            raise DcpoError(f"{name}: column '{column}' is missing")
        actual = table.schema.field(column).type
        if not _compatible(actual, expected):
            raise DcpoError(
                f"{name}: column '{column}' has type {actual}, expected {_type_name(expected)}"
            )
        if table.column(column).null_count:
            raise DcpoError(f"{name}: column '{column}' has missing values")
    if table.num_rows == 0:
        raise DcpoError(f"{name}: the file has no rows")
    if kind == "prompts":
        ids = table.column("prompt_id")
        if len(ids.unique()) != table.num_rows:
            raise DcpoError(f"{name}: column 'prompt_id' has duplicate values")
    check_unique_responses(table, name)
    check_token_lists(table, name)


# The response's token ids, the reference every per-token list is checked against.
TOKEN_IDS = "response_token_ids"
RESPONSE_LENGTH = "response_length"  # an optional count of those tokens (verl, other tools)


def per_token_columns(table: pa.Table) -> list[str]:
    """The per-token lists beside the token ids: `response_logprobs`, and any other list
    column named `response_*` (a mask, entropies or log-probs other tools add)."""
    return [field.name for field in table.schema
            if field.name.startswith("response_") and field.name != TOKEN_IDS
            and (pa.types.is_list(field.type) or pa.types.is_large_list(field.type))]


def check_token_lists(table: pa.Table, name: str) -> None:
    """Every per-token list holds one value per response token, and `response_length`, when
    present, is that count: else one line naming the file, the first bad row (0-based) and
    the column. Vectorised (list lengths); a per-token column with no value at all is left
    alone (a tool that did not record it), one with gaps is not."""
    if TOKEN_IDS not in table.column_names:
        return
    tokens = pa.compute.list_value_length(table.column(TOKEN_IDS))
    for column in per_token_columns(table):
        values = table.column(column)
        if values.null_count == table.num_rows:
            continue
        _first_mismatch(pa.compute.list_value_length(values), tokens, name, column, "values")
    if RESPONSE_LENGTH in table.column_names \
            and pa.types.is_integer(table.schema.field(RESPONSE_LENGTH).type):
        _first_mismatch(table.column(RESPONSE_LENGTH), tokens, name, RESPONSE_LENGTH, None)


def _first_mismatch(lengths, tokens, name: str, column: str, unit: str | None) -> None:
    agree = pa.compute.fill_null(pa.compute.equal(lengths, tokens), False)
    if pa.compute.all(agree).as_py():
        return
    row = pa.compute.index(agree, False).as_py()
    count, expected = lengths[row].as_py(), tokens[row].as_py()
    found = "no value" if count is None else (f"{count} {unit}" if unit else f"{count}")
    against = "no value" if expected is None else f"{expected} tokens"
    raise DcpoError(f"{name}: row {row}: column '{column}' has {found}, but "
                    f"'{TOKEN_IDS}' has {against}")


RESPONSE_KEY = ("step", "prompt_id", "sample_index")


def check_unique_responses(table: pa.Table, name: str, hint: str = "") -> None:
    """A response is (step, prompt_id, sample_index): one row each, or the SAS state would
    absorb a prompt twice in one step. Files without the three columns are not checked."""
    if not set(RESPONSE_KEY) <= set(table.column_names):
        return
    keys = list(RESPONSE_KEY)
    counts = table.select(keys).group_by(keys).aggregate([([], "count_all")])
    if counts.num_rows == table.num_rows:
        return
    first = counts.filter(pa.compute.greater(counts["count_all"], 1)).slice(0, 1).to_pylist()[0]
    raise DcpoError(f"{name}: the same response (step, prompt_id, sample_index) appears more "
                    f"than once: ({first['step']}, {first['prompt_id']!r}, "
                    f"{first['sample_index']}), {first['count_all']} rows{hint}")


def read_parquet(path: str | Path) -> pa.Table:
    """Read any Parquet file, turning every way it can be unreadable into one clear line."""
    path = Path(path)
    if not path.exists():
        raise DcpoError(f"{path}: no such file")
    if path.is_dir():
        raise DcpoError(f"{path}: is a directory, expected a Parquet file")
    if path.stat().st_size == 0:
        raise DcpoError(f"{path.name}: the file is empty")
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        reason = first_line(exc)
        raise DcpoError(f"{path.name}: not a readable Parquet file ({reason})") from None


def read_table(path: str | Path, kind: str,
               columns: dict[str, pa.DataType | None] | None = None) -> pa.Table:
    """Read a dcpo file of the given kind and check it against its contract."""
    table = read_parquet(path)
    validate(table, kind, path, columns)
    return table


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The dcpo metadata record of a Parquet file ({} for files made by other tools)."""
    try:
        raw = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError):
        return {}
    if METADATA_KEY not in raw:
        return {}
    try:
        return json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError:
        return {}


def file_checksum(path: str | Path) -> str:
    """sha256 of a file's bytes, recorded in the metadata of every file made from it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_metadata(kind: str, stage: str, step: int | None = None,
                  options: dict[str, Any] | None = None,
                  inputs: list[str | Path] | None = None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "dcpo_version": __version__,
        "kind": kind,
        "stage": stage,
        "step": step,
        "options": _jsonable(options or {}),
        "inputs": {str(p): file_checksum(p) for p in inputs or []},
        **(_jsonable(extra or {})),
    }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it into place.

    Works for files and directories alike. On any error the temporary is removed, so a path
    that exists is always complete.
    """
    path = Path(path)
    check_output_path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        _fsync_tree(target)
        os.replace(target, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output_path(path: str | Path) -> None:
    """Refuse an output that would replace a directory, or whose folder cannot be made;
    called before the work, so a bad --out never costs a finished generation."""
    path = Path(path)
    if path.is_dir():
        raise DcpoError(f"{path}: is an existing directory; give a new path to write to")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DcpoError(f"{path}: cannot create its folder ({exc.strerror or exc})") from None
    if not os.access(path.parent, os.W_OK):
        raise DcpoError(f"{path.parent}: not writable")


def _fsync_tree(path: Path) -> None:
    """fsync every file, then every folder, so a power cut never leaves a renamed but
    incomplete directory."""
    if path.is_file():
        entries = [path]
    else:
        entries = [p for p in path.rglob("*") if p.is_file()]
        entries += sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True) + [path]
    for entry in entries:
        if entry.is_dir():
            _fsync_dir(entry)
            continue
        with open(entry, "rb") as handle:
            os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_table(table: pa.Table, path: str | Path, metadata: dict[str, Any],
                validate_kind: bool = True) -> None:
    """Validate `table` against its kind and write it atomically with the dcpo metadata."""
    kind = metadata["kind"]
    if validate_kind and kind in CONTRACTS:
        validate(table, kind, path)
    merged = dict(table.schema.metadata or {})
    merged[METADATA_KEY] = json.dumps(metadata, sort_keys=True).encode()
    table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_json(data: Any, path: str | Path) -> None:
    """Write a JSON document atomically (state files, summaries, metrics)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=True) + "\n")


def detect_kind(table: pa.Table, metadata: dict[str, Any]) -> str:
    """The contract a table follows: from its metadata, else the richest contract it meets."""
    if metadata.get("kind"):
        return metadata["kind"]
    names = set(table.column_names)
    for kind in ("scored", "rollouts", "train_records", "eval_samples", "prompts"):
        if set(CONTRACTS[kind]) <= names:
            return kind
    return "parquet"
