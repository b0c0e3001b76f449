"""train-step crash safety: is this step new, already trained, or already done, and the
idempotent writes that make a re-run end with the files of an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError
from dcpo_cli.files import contracts
from dcpo_cli.files.checkpoint import read_trainer_state
from dcpo_cli.files.sas_state import SasState
from dcpo_cli.train.inputs import StepData

SAS_SNAPSHOT = "sas_state.json"


def state_checksum(path: Path) -> str | None:
    return contracts.file_checksum(path) if path.is_file() else None


def resume_decision(out: Path, state_path: Path, data: StepData, state: SasState) -> str:
    """"fresh" (train), "sync" (CKPT done, STATE behind) or "done" (both written).

    Raises when the step was already absorbed without this CKPT, or CKPT holds other work.
    """
    if out.exists():
        trainer = read_trainer_state(out) if out.is_dir() else None
        if trainer is None:
            raise DcpoError(f"{out}: exists and is not a train-step checkpoint; choose another "
                            "--out")
        if trainer.get("scored_checksums") != data.checksums:
            raise DcpoError(f"{out}: a checkpoint trained on other scored files already exists; "
                            "choose another --out")
        current = state_checksum(state_path)
        if current == contracts.file_checksum(out / SAS_SNAPSHOT):
            return "done"
        if state.last_step is not None and state.last_step > data.step:
            return "done"  # a loop re-run: later steps have already moved STATE on
        if current == trainer.get("state_before_checksum"):
            return "sync"
        raise DcpoError(f"{state_path}: changed since {out.name} was written from it; "
                        "cannot sync the SAS state")
    if state.last_step is not None and state.last_step >= data.step:
        raise DcpoError(f"{state_path}: already absorbed step {state.last_step}; refusing to "
                        f"train on step {data.step} again")
    return "fresh"


def align_state_with_model(model_dir: Path, state_path: Path, state: SasState) -> SasState:
    """STATE must be the state the --model checkpoint left behind. If that checkpoint's own
    state update never happened (killed in between), finish it now; anything else would
    train on statistics that skipped or repeated a step."""
    snapshot = model_dir / SAS_SNAPSHOT
    if not snapshot.is_file():
        return state
    current = state_checksum(state_path)
    if current == contracts.file_checksum(snapshot):
        return state
    trainer = read_trainer_state(model_dir) or {}
    if current == trainer.get("state_before_checksum"):
        copy_atomic(snapshot, state_path)
        return SasState.load(state_path)
    raise DcpoError(f"{state_path}: is not the SAS state {model_dir.name} left behind (it holds "
                    f"step {state.last_step}, the checkpoint step {trainer.get('rollout_step')})"
                    "; pass this run's state file")


def copy_atomic(source: Path, target: Path) -> None:
    with contracts.atomic_path(target) as tmp:
        tmp.write_bytes(source.read_bytes())


def append_metrics_once(log: Path, metrics: dict[str, Any]) -> None:
    """Append the step's metrics record unless a re-run already did (same step, same CKPT);
    a half-written last line left by a crash is dropped first."""
    log.parent.mkdir(parents=True, exist_ok=True)
    text = log.read_text() if log.is_file() else ""
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        log.write_text(text)
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            old = json.loads(line)
            if old.get("step") == metrics["step"] and old.get("checkpoint") == \
                    metrics["checkpoint"]:
                return
    with open(log, "a") as handle:
        handle.write(json.dumps(metrics, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


