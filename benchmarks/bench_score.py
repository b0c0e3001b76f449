"""Scoring throughput: the math-verify pool with all workers against one worker process.

    .venv/bin/python benchmarks/bench_score.py [--repeat 4] [--data math500.jsonl]

Responses are MATH-500's reference solutions (each ends in \\boxed{answer}; the copy bundled
with dcpo unless --data), repeated `--repeat` times with the gold answer of the same or of
another problem, so half are right.
Target: all workers at least 1.7x faster than one on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


BUNDLED_MATH500 = Path(__file__).resolve().parents[1] / "dcpo_cli/data/benchmarks/math500.jsonl.gz"


def load_pairs(data: Path, repeat: int) -> tuple[list[str], list[str]]:
    from dcpo_cli.stages.prepare import load_records

    rows = load_records(str(data))
    responses, answers = [], []
    for copy in range(repeat):
        for i, row in enumerate(rows):
            responses.append(row["solution"])
            other = rows[(i + 1) % len(rows)] if copy % 2 else row
            answers.append(other["answer"])
    return responses, answers


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from dcpo_cli.rewards import verify_batch
    from dcpo_cli.rewards.pool import default_workers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--data", type=Path, default=BUNDLED_MATH500,
                        help="MATH-500 as JSONL (.gz too), with solution and answer fields")
    args = parser.parse_args()
    responses, answers = load_pairs(args.data, args.repeat)

    table = Table(title=f"score: {len(responses)} MATH-500 responses")
    for column in ("workers", "seconds", "responses/s", "correct", "speed-up"):
        table.add_column(column, justify="right")
    baseline = None
    for workers in sorted({1, default_workers()}):
        start = time.perf_counter()
        verdicts = verify_batch(responses, answers, workers=workers, timeout=10.0)
        seconds = time.perf_counter() - start
        baseline = baseline or seconds
        table.add_row(str(workers), f"{seconds:.2f}", f"{len(responses) / seconds:.0f}",
                      str(sum(v.correct for v in verdicts)), f"{baseline / seconds:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
