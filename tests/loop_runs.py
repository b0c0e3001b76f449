"""The reduced tiny loop the run tests share: its settings, the commands of the shell loop
(examples/tiny_loop.sh) and of `dcpo run`, and the comparison of two runs' files (everything
either writes, normalised only for wall-clock times and the run directory). conftest.py
builds the reference runs from these once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch
from conftest import REPO

STEPS = 2  # a fresh step, then one that carries the SAS state and optimizer on
# As tests/test_loop.py: the reduced tiny model, a few seconds per stage on 2 cores.
LOOP_ENV = {"TINY_SIZE": "test", "BATCH": "4", "N": "4", "MAX_NEW_TOKENS": "12",
            "EVAL_AT": "2", "LR": "1e-3", "SEED": "3", "REWARD": "loop_reward:parity",
            "DCPO": f"{sys.executable} -m dcpo_cli"}
RUN_FLAGS = ["--tiny-size", "test", "--batch-size", "4", "--n", "4", "--max-new-tokens", "12",
             "--eval-at", "2", "--lr", "1e-3", "--seed", "3", "--reward", "loop_reward:parity"]
# The reduced model never answers correctly: a reward that gives every group mixed outcomes.
PARITY_REWARD = ("def parity(response_text, answer, row):\n"
                 "    return float(len(response_text) % 2)\n")
# Fields that differ between any two runs of the shell loop itself: wall-clock times, and
# the cheap model fingerprint (file times of the base model; a checkpoint's metrics.json,
# which holds times), with the checksums of the files that record it.
TIMINGS = {"seconds", "load_seconds", "compute_seconds", "tokens_per_second",
           "generate_seconds", "engine_load_seconds", "model_fingerprint",
           # the process's peak memory: one process for every stage is larger, by design
           "peak_cpu_rss_gib", "peak_cpu_rss_gib_per_rank", "peak_gpu_memory_gib",
           "peak_gpu_memory_gib_per_rank"}
CHECKSUMS = {"inputs", "scored_checksums"}  # file -> checksum: the files named are compared


def loop_env(reward_dir: Path) -> dict[str, str]:
    """The shell loop's settings (LOOP_ENV), with `reward_dir`'s loop_reward.py importable."""
    path = os.pathsep.join(filter(None, [str(reward_dir), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **LOOP_ENV, "PYTHONPATH": path, "COLUMNS": "200"}


def shell_loop(run_dir: Path, steps: int, env: dict[str, str]) -> list[str]:
    return ["bash", str(REPO / "examples" / "tiny_loop.sh"), str(run_dir), str(steps)]


def dcpo_run(run_dir: Path, steps: int | None, flags: list[str] | None = None) -> list[str]:
    command = [sys.executable, "-m", "dcpo_cli", "run", str(run_dir)]
    return command + (["--steps", str(steps)] if steps else []) + (RUN_FLAGS if flags is None
                                                                   else flags)


def with_tiny_of(run_dir: Path, reference_dir: Path) -> Path:
    """`run_dir`, new, holding a copy of `reference_dir`'s tiny model and task (built with
    the same seed and size), so that a loop started there skips `dcpo tiny init` as a resumed
    run does: for the tests whose subject is not the init (the reference runs build theirs,
    and comparing with them checks the copy)."""
    import shutil

    shutil.copytree(reference_dir / "tiny", run_dir / "tiny")
    return run_dir


def finish(command: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _normal(value, run_dir: Path):
    """JSON-like value with timings dropped and the run directory's path replaced."""
    if isinstance(value, dict):
        return {_normal(k, run_dir): sorted(_normal(list(v), run_dir)) if k in CHECKSUMS
                else _normal(v, run_dir) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_normal(v, run_dir) for v in value]
    if isinstance(value, str):
        return value.replace(str(run_dir.resolve()), "RUN").replace(str(run_dir), "RUN")
    return value


def _parquet(path: Path, run_dir: Path) -> dict:
    table = pq.read_table(path)
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    metadata = {k: _normal(json.loads(v) if v.startswith(("{", "[")) else v, run_dir)
                for k, v in metadata.items() if not k.startswith("ARROW")}
    rows = {name: [_nan_equal(v) for v in values] for name, values in table.to_pydict().items()}
    return {"rows": rows, "metadata": metadata}


def _nan_equal(value):
    """NaN (the records of groups DAPO dropped) as a marker that compares equal."""
    return "NaN" if isinstance(value, float) and value != value else value


def _rng(path: Path) -> dict:
    state = torch.load(path, weights_only=False)
    return {"torch": state["torch"].tolist(), "python": state["python"]}


def _training_state(ckpt: Path) -> dict | None:
    """The DCP training state (fp32 master weights, AdamW moments) as name -> raw bytes."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not (ckpt / "training_state").is_dir():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(ckpt / "training_state", Path(tmp) / "state.pt")
        state = torch.load(Path(tmp) / "state.pt", weights_only=False)
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif torch.is_tensor(value):
            flat[prefix] = (str(value.dtype), tuple(value.shape),
                            value.detach().cpu().contiguous().numpy().tobytes())
        else:
            flat[prefix] = value

    walk("", state)
    return flat


def run_files(run_dir: Path, steps: int = STEPS) -> dict:
    """Everything the loop writes, normalised only for wall-clock times and the directory."""
    files: dict = {"state": (run_dir / "state.json").read_bytes(),
                   "metrics": [_normal(json.loads(line), run_dir) for line in
                               (run_dir / "metrics.jsonl").read_text().splitlines()]}
    for step in range(steps):
        folder = run_dir / "steps" / f"{step:06d}"
        for path in sorted(folder.glob("*.parquet")):  # rollouts, scored (-rK: refill rounds)
            files[f"{step}/{path.stem}"] = _parquet(path, run_dir)
        ckpt = run_dir / "ckpt" / f"step-{step + 1:06d}"
        weights = "adapter_model.safetensors" if (ckpt / "adapter_model.safetensors").is_file() \
            else "model.safetensors"  # a LoRA checkpoint holds the adapter alone
        for name in (weights, "sas_state.json"):
            files[f"{step}/{name}"] = (ckpt / name).read_bytes()
        # --keep-training-state 1: only the newest checkpoint keeps it, in both runs
        files[f"{step}/training_state"] = _training_state(ckpt)
        files[f"{step}/records"] = _parquet(ckpt / "train_records.parquet", run_dir)
        for name in ("trainer_state.json", "metrics.json"):
            files[f"{step}/{name}"] = _normal(json.loads((ckpt / name).read_text()), run_dir)
        if (ckpt / "training_state").is_dir():
            files[f"{step}/rng"] = _rng(ckpt / "training_state" / "rng_state.pt")
    for label in ("step-000000", f"step-{steps:06d}"):
        eval_dir = run_dir / "eval" / label
        files[f"eval/{label}"] = _normal(json.loads((eval_dir / "summary.json").read_text()),
                                         run_dir)
        files[f"eval/{label}/samples"] = _parquet(eval_dir / "test" / "samples.parquet",
                                                  run_dir)
    return files


def assert_same_run(run_dir: Path, reference_dir: Path, steps: int = STEPS) -> None:
    ours, theirs = run_files(run_dir, steps), run_files(reference_dir, steps)
    # Step 0's train-step starts in a fresh state: Python's `random` state it saves is the
    # process's own (seeded by the OS) in the shell loop too, and later steps carry it on.
    for files in (ours, theirs):
        assert files[f"{steps - 1}/training_state"] is not None
        for key in [k for k in files if k.endswith("/rng")]:
            files[key].pop("python")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == theirs[key], key


def rank_pids(root: int, rank: str) -> list[int]:
    """The processes under `root` whose environment says RANK=`rank` (torchrun's workers)."""
    import subprocess

    found = []
    children = subprocess.run(["pgrep", "-P", str(root)], capture_output=True, text=True)
    for pid in map(int, children.stdout.split()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            found.append(pid)
        found += rank_pids(pid, rank)
    return found
