"""The benchmark registry and loaders used by `dcpo eval`.

A benchmark is a registry name (aime24, aime25, amc23, math500, gsm8k) or a path to any
prompts Parquet / JSONL / verl Parquet file (named after the file stem). Registry
benchmarks come from a local data directory (`--data-dir` or `DCPO_DATA_DIR`, holding the
files named as in the project's shared benchmark folder: the JSONL or the verl Parquet) or
else from the Hugging Face Hub through `datasets`, imported only then.

Records become prompt rows through `dcpo_cli.prepare` (the same code as `dcpo prepare`): the
problem plus the instruction as one user message. verl-layout files keep their own chat
messages (system instruction + problem), as the official DCPO evaluation uses them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcpo_cli import contracts
from dcpo_cli.errors import DcpoError, first_line
from dcpo_cli.options import PAPER_INSTRUCTION
from dcpo_cli.prepare import load_records, prepare_records

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
    """`--data-dir` when given, else $DCPO_DATA_DIR, else None (use the Hub)."""
    if option is not None:
        return Path(option)
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(env) if env else None


def is_file_benchmark(name: str) -> bool:
    return Path(name).suffix.lower() in (".jsonl", ".json", ".parquet") or Path(name).exists()


def benchmark_name(spec: str) -> str:
    """The name results are stored under: the registry name or the file stem."""
    return spec if spec in REGISTRY else Path(spec).stem


def load_benchmark(spec: str, data_dir: Path | None = None, *,
                   instruction: str = PAPER_INSTRUCTION, limit: int | None = None
                   ) -> BenchmarkData:
    """Prompt rows of a registry benchmark or a benchmark file (first `limit` problems)."""
    if spec in REGISTRY:
        data = _load_registered(REGISTRY[spec], data_dir, instruction)
    elif is_file_benchmark(spec):
        path = Path(spec)
        if not path.is_file():
            raise DcpoError(f"{spec}: no such benchmark file")
        data = _from_file(path.stem, path, instruction, None, None)
    else:
        raise DcpoError(f"{spec}: unknown benchmark (choose from {', '.join(REGISTRY)}, "
                        "or give a path to a JSONL or Parquet file)")
    if limit is not None:
        if limit < 1:
            raise DcpoError(f"--limit must be at least 1 (got {limit})")
        data.rows = data.rows[:limit]
    return data


def _load_registered(bench: Benchmark, data_dir: Path | None, instruction: str
                     ) -> BenchmarkData:
    if data_dir is not None:
        if not data_dir.is_dir():
            raise DcpoError(f"{data_dir}: data directory not found (from --data-dir or "
                            f"{DATA_DIR_ENV})")
        for relative in bench.local_files:
            path = data_dir / relative
            if path.is_file():
                return _from_file(bench.name, path, instruction, bench.problem_field,
                                  bench.answer_field)
        raise DcpoError(f"{bench.name}: none of {', '.join(bench.local_files)} found in "
                        f"{data_dir}")
    return _from_hub(bench, instruction)


def _from_file(name: str, path: Path, instruction: str, problem_field: str | None,
               answer_field: str | None) -> BenchmarkData:
    records = load_records(str(path))
    if path.suffix.lower() == ".parquet" and records and "prompt_id" in records[0]:
        # already a prompts file (from `dcpo prepare`): use it as it is
        table = contracts.read_table(path, "prompts")
        rows = [{"problem": None, "source": name, **row} for row in table.to_pylist()]
    else:
        verl = path.suffix.lower() == ".parquet"  # the field names apply to JSONL/Hub only
        rows = prepare_records(records, path.name, instruction=instruction, source=name,
                               problem_field=None if verl else problem_field,
                               answer_field=None if verl else answer_field).rows
    return BenchmarkData(name, rows, str(path), contracts.file_checksum(path))


def _from_hub(bench: Benchmark, instruction: str) -> BenchmarkData:
    fix = (f"pass --data-dir DIR (or set {DATA_DIR_ENV}) to a folder holding "
           f"{' or '.join(bench.local_files)}")
    try:
        import datasets
    except ImportError:
        raise DcpoError(f"{bench.name}: no local copy and the `datasets` package is not "
                        f"installed to fetch {bench.hub}; {fix}") from None
    try:
        dataset = datasets.load_dataset(bench.hub, bench.config, split=bench.split)
        records = [dict(row) for row in dataset]
    except Exception as exc:  # offline, hub errors: all end as one line with the fix
        reason = first_line(exc)
        raise DcpoError(f"{bench.name}: could not load {bench.hub} from the Hub ({reason}); "
                        f"{fix}") from None
    rows = prepare_records(records, bench.hub, instruction=instruction, source=bench.name,
                           problem_field=bench.problem_field,
                           answer_field=bench.answer_field).rows
    fingerprint = f"hub:{bench.hub}:{bench.config}:{bench.split}"
    return BenchmarkData(bench.name, rows, bench.hub, fingerprint)
