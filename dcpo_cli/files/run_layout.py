"""The run directory's layout: the one place that names its files and folders. `dcpo run`
writes it, `dcpo study` checks it, `dcpo report` reads it; examples/tiny_loop.sh writes the
same names from the shell.

    RUN_DIR/
      run.toml              dcpo run's settings (run/config.py)
      state.json            the SAS state, train-step's --state
      metrics.jsonl         one train-step record per line, train-step's --metrics-log
      steps/NNNNNN/         rollout step N's files: rollouts.parquet, scored.parquet (DAPO's
                            refill rounds: rollouts-rK.parquet, scored-rK.parquet)
      ckpt/step-NNNNNN/     the checkpoint of global step N (rollout step N - 1 trained it)
      eval/step-NNNNNN/     the evaluation of that checkpoint (step-000000: the base model)
      tiny/                 the tiny task (model/, train.parquet, test.parquet) without --model

Plain names and `Path` arithmetic only: imported by `dcpo --help`'s modules.
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "run.toml"
STATE_FILE = "state.json"
METRICS_LOG = "metrics.jsonl"
STEPS = "steps"
CHECKPOINTS = "ckpt"
EVALS = "eval"
TINY = "tiny"
STEP_LABEL = re.compile(r"step-(\d+)$")  # a checkpoint's or an evaluation's folder name


def step_dir(run_dir: Path, step: int) -> Path:
    """Rollout step `step`'s rollouts and scores."""
    return Path(run_dir) / STEPS / f"{step:06d}"


def rollouts_file(folder: Path, round_index: int | None = None) -> Path:
    """A step's rollouts; with `round_index`, those of one of DAPO's refill rounds."""
    return Path(folder) / ("rollouts.parquet" if round_index is None
                           else f"rollouts-r{round_index}.parquet")


def scored_file(folder: Path, round_index: int | None = None) -> Path:
    """A step's scored rollouts; with `round_index`, one refill round's."""
    return Path(folder) / ("scored.parquet" if round_index is None
                           else f"scored-r{round_index}.parquet")


def step_label(global_step: int) -> str:
    """The folder name of a checkpoint and of its evaluation: `step-NNNNNN`."""
    return f"step-{global_step:06d}"


def label_step(label: str) -> int | None:
    """The global step a `step-NNNNNN` folder name holds (None for another name)."""
    match = STEP_LABEL.match(label)
    return int(match.group(1)) if match else None


def checkpoint_dir(run_dir: Path, global_step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / step_label(global_step)


def eval_dir(run_dir: Path, label: str) -> Path:
    """An evaluation's folder; `label` is `step_label(global_step)` in the loop."""
    return Path(run_dir) / EVALS / label


def state_file(run_dir: Path) -> Path:
    return Path(run_dir) / STATE_FILE


def metrics_log(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_LOG


def config_file(run_dir: Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


def tiny_dir(run_dir: Path) -> Path:
    return Path(run_dir) / TINY
