"""The benchmark registry and loaders used by `dcpo eval`.

A benchmark is a registry name (aime24, aime25, amc23, math500, gsm8k), a path to any
prompts Parquet / JSONL / verl Parquet file (named after the file stem), or a Hub dataset
name `owner/name`. Registry benchmarks ship inside the package (dcpo_cli/data/benchmarks,
gzip-compressed JSONL; SOURCES.md there names each source and license), so they load
offline; a local data directory (`--data-dir` or `DCPO_DATA_DIR`, holding files named
aime24.jsonl ... or verl/aime_2024.parquet ...) overrides them. Hub names load through
`datasets`, imported only then.

Records become prompt rows through `dcpo_cli.stages.prepare` (the same code as `dcpo prepare`): by
default the official layout, the instruction as the system message and the bare problem as
the user message (`instruction_in="user"`: both in one user message). verl-layout files keep
their own chat messages, which are that same official layout, so a problem read from the
bundled JSONL or from the verl Parquet gives the same prompt tokens.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError, first_line
from dcpo_cli.options import PAPER_INSTRUCTION

# Light at import (pyarrow comes with the loaders): `dcpo eval --help` lists REGISTRY.

DATA_DIR_ENV = "DCPO_DATA_DIR"


@dataclass(frozen=True)
class Benchmark:
    name: str
    local_files: tuple[str, ...]  # looked for in the data directory, in this order
    hub: str
    split: str
    config: str | None
    problem_field: str  # in the JSONL files and the Hub dataset alike
    answer_field: str

    @property
    def bundled(self) -> str:
        """The packaged copy, in dcpo_cli/data/benchmarks."""
        return f"{self.name}.jsonl.gz"


REGISTRY: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("aime24", ("aime24.jsonl", "verl/aime_2024.parquet"),
              "HuggingFaceH4/aime_2024", "train", None, "problem", "answer"),
    Benchmark("aime25", ("aime25.jsonl", "verl/aime_2025.parquet"),
              "yentinglin/aime_2025", "train", None, "problem", "answer"),
    Benchmark("amc23", ("amc23.jsonl", "verl/amc2023.parquet"),
              "math-ai/amc23", "test", None, "question", "answer"),
    Benchmark("math500", ("math500.jsonl", "verl/math500.parquet"),
              "HuggingFaceH4/MATH-500", "test", None, "problem", "answer"),
    Benchmark("gsm8k", ("gsm8k.jsonl",),
              "openai/gsm8k", "test", "main", "question", "answer"),
)}


@dataclass
class BenchmarkData:
    name: str
    rows: list[dict[str, Any]]  # prompts contract: prompt_id, prompt, answer, problem, source
    source: str  # the file or Hub dataset the rows came from
    fingerprint: str  # sha256 of the file, or the Hub name/split/config


def data_dir_from(option: Path | None) -> Path | None:
    """`--data-dir` when given, else $DCPO_DATA_DIR, else None (use the bundled copies)."""
    if option is not None:
        return Path(option)
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(env) if env else None


def is_file_benchmark(name: str) -> bool:
    return (Path(name).suffix.lower() in (".jsonl", ".json", ".parquet", ".gz")
            or Path(name).exists())


def is_hub_name(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not Path(name).suffix


def benchmark_name(spec: str) -> str:
    """The name results are stored under: the registry name, the file stem, or for a Hub
    dataset its name after the owner."""
    if spec in REGISTRY:
        return spec
    name = Path(spec).name
    return Path(name[:-3] if name.lower().endswith(".gz") else name).stem


def load_benchmark(spec: str, data_dir: Path | None = None, *,
                   instruction: str = PAPER_INSTRUCTION, limit: int | None = None,
                   instruction_in: str = "system") -> BenchmarkData:
    """Prompt rows of a registry benchmark or a benchmark file (first `limit` problems)."""
    layout = (instruction, instruction_in)
    if spec in REGISTRY:
        data = _load_registered(REGISTRY[spec], data_dir, layout)
    elif is_file_benchmark(spec):
        path = Path(spec)
        if not path.is_file():
            raise DcpoError(f"{spec}: no such benchmark file")
        data = _from_file(benchmark_name(spec), path, layout, None, None)
    elif is_hub_name(spec):
        data = _from_hub_name(spec, layout)
    else:
        raise DcpoError(f"{spec}: unknown benchmark (choose from {', '.join(REGISTRY)}, "
                        "give a path to a JSONL or Parquet file, or a Hub dataset owner/name)")
    if limit is not None:
        if limit < 1:
            raise DcpoError(f"--limit must be at least 1 (got {limit})")
        data.rows = data.rows[:limit]
    return data


def _load_registered(bench: Benchmark, data_dir: Path | None, layout: tuple[str, str]
                     ) -> BenchmarkData:
    if data_dir is not None:
        if not data_dir.is_dir():
            raise DcpoError(f"{data_dir}: data directory not found (from --data-dir or "
                            f"{DATA_DIR_ENV})")
        for relative in bench.local_files:
            path = data_dir / relative
            if path.is_file():
                return _from_file(bench.name, path, layout, bench.problem_field,
                                  bench.answer_field)
        raise DcpoError(f"{bench.name}: none of {', '.join(bench.local_files)} found in "
                        f"{data_dir}")
    packaged = resources.files("dcpo_cli").joinpath("data", "benchmarks", bench.bundled)
    with resources.as_file(packaged) as path:
        if not path.is_file():  # only a broken install gets here
            raise DcpoError(f"{bench.name}: the packaged copy {path} is missing; reinstall "
                            f"dcpo-cli or pass --data-dir")
        return _from_file(bench.name, path, layout, bench.problem_field,
                          bench.answer_field)


def _from_file(name: str, path: Path, layout: tuple[str, str], problem_field: str | None,
               answer_field: str | None) -> BenchmarkData:
    """`layout`: (instruction, where it goes: "system" or "user")."""
    from dcpo_cli.files import contracts
    from dcpo_cli.stages.prepare import load_records, prepare_records

    records = load_records(str(path))
    if path.suffix.lower() == ".parquet" and records and "prompt_id" in records[0]:
        # already a prompts file (from `dcpo prepare`): use it as it is
        table = contracts.read_table(path, "prompts")
        rows = [{"problem": None, "source": name, **row} for row in table.to_pylist()]
    else:
        verl = path.suffix.lower() == ".parquet"  # the field names apply to JSONL/Hub only
        rows = prepare_records(records, path.name, instruction=layout[0], source=name,
                               instruction_in=layout[1],
                               problem_field=None if verl else problem_field,
                               answer_field=None if verl else answer_field).rows
    return BenchmarkData(name, rows, str(path), contracts.file_checksum(path))


def _from_hub_name(name: str, layout: tuple[str, str]) -> BenchmarkData:
    """A Hub dataset outside the registry: its test split (else train, else its only one),
    with the problem and answer fields found as `dcpo prepare` finds them."""
    from dcpo_cli.extras import load
    from dcpo_cli.stages.prepare import prepare_records

    datasets = load("hub", f"{name}: a Hub dataset (no local file of that name)")
    try:
        splits = datasets.load_dataset(name)
        split = next((s for s in ("test", "train") if s in splits), None)
        if split is None and len(splits) == 1:
            split = next(iter(splits))
        if split is None:
            raise ValueError(f"no test or train split among {', '.join(splits)}")
        records = [dict(row) for row in splits[split]]
    except Exception as exc:  # offline, hub errors: all end as one line
        reason = first_line(exc)
        raise DcpoError(f"{name}: could not load the Hub dataset ({reason}); give a local "
                        "JSONL or Parquet file instead") from None
    rows = prepare_records(records, name, instruction=layout[0], instruction_in=layout[1],
                           source=benchmark_name(name)).rows
    return BenchmarkData(benchmark_name(name), rows, name, f"hub:{name}:{split}")
