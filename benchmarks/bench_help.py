"""How long `dcpo --help` takes, beside the floor a user could not beat.

Three commands, each started as a fresh process `--repeat` times (interleaved, so a change
in the machine's load hits all three alike), help piped at 80 columns as in `dcpo --help |
less`; the median wall time of each, and its ratio to the other two:

- `python -c pass`: the interpreter's start-up alone;
- a bare typer app with dcpo's commands (the same names and one-line docstrings, no
  options, typer's own rich help): what any typer CLI costs;
- `dcpo --help`, the installed console script.

    .venv/bin/python benchmarks/bench_help.py --repeat 21
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE_APP = '''
import typer

app = typer.Typer(name="dcpo", help="Train language models with DCPO.", no_args_is_help=True,
                  add_completion=False, rich_markup_mode="rich")
tiny = typer.Typer(help="The built-in tiny model and arithmetic task.", no_args_is_help=True)
app.add_typer(tiny, name="tiny")


@app.callback()
def root(version: bool = typer.Option(False, "--version", help="Print the version."),
         verbose: bool = typer.Option(False, "--verbose", help="Show other libraries' logs.")):
    """Train language models with DCPO."""


def command(name, doc, group=app):
    def body():
        pass
    body.__doc__ = doc
    group.command(name)(body)


for name, doc in [
        ("prepare", "Turn a problem set into the prompts contract."),
        ("inspect", "Show a file's kind, rows, schema, metadata and first rows."),
        ("rollout", "Generate --n responses for each prompt of step N's batch."),
        ("score", "Score responses with math-verify and write one scored file."),
        ("train-step", "Apply one DCPO (or GRPO/DAPO/GSPO) update and write a checkpoint."),
        ("eval", "Evaluate a model on benchmarks the way the paper does."),
        ("report", "Plot reward, clipping, utilization, length and KL per step."),
        ("run", "Run rollout -> score -> train-step for each step in one process.")]:
    command(name, doc)
command("init", "Write a tiny Qwen2 model and its prompts.", tiny)
app(prog_name="dcpo")
'''


def dcpo_command() -> list[str]:
    script = Path(sys.executable).with_name("dcpo")
    if script.exists():
        return [str(script)]
    found = shutil.which("dcpo")
    return [found] if found else [sys.executable, "-m", "dcpo_cli"]


def wall(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {proc.stderr.decode()[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    env = {**os.environ, "COLUMNS": "80"}
    with tempfile.TemporaryDirectory() as folder:
        bare = Path(folder) / "bare_typer_app.py"
        bare.write_text(BARE_APP)
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "bare typer app --help": [sys.executable, str(bare), "--help"],
            "dcpo --help": [*dcpo_command(), "--help"],
        }
        for command in commands.values():  # warm the file cache and the .pyc files
            wall(command, env)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeat):
            for name, command in commands.items():
                times[name].append(wall(command, env))
    median = {name: statistics.median(values) for name, values in times.items()}
    python, bare_app = median["python -c pass"], median["bare typer app --help"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.repeat} runs each, interleaved; load average {load:.2f} on "
          f"{os.cpu_count()} CPUs")
    print(f"{'':24} {'median s':>9} {'min s':>7} {'/ python':>9} {'/ bare typer':>13}")
    for name, value in median.items():
        print(f"{name:24} {value:9.3f} {min(times[name]):7.3f} {value / python:9.2f} "
              f"{value / bare_app:13.2f}")
    print(f"dcpo --help above the bare typer app: {median['dcpo --help'] - bare_app:+.3f} s")


if __name__ == "__main__":
    main()
