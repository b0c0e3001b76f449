"""The flagship example of the README and docs/loop.md, examples/qwen2.5-math-7b.sh, run end
to end for 2 steps on the test-size tiny model and task: hf engine (no GPU), local model and
data (no downloads), small batches and short responses. A re-run resumes: it redoes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from dcpo_cli.files import contracts

SCRIPT = REPO / "examples" / "qwen2.5-math-7b.sh"
# rewritten by every run on purpose: the summary of reused results, the figure
REWRITTEN = {"summary.json", "options.json", "report.png"}


def run_example(run: Path, tiny: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "DCPO": f"{sys.executable} -m dcpo_cli", "ENGINE": "hf",
           "MODEL": str(tiny / "model"), "DATA": str(tiny / "train.parquet"),
           "EVAL_BENCHMARKS": str(tiny / "test.parquet"), "EVAL_LIMIT": "4", "EVAL_AT": "2",
           "EVAL_EVERY": "2", "BATCH": "4", "N": "2", "MAX_NEW_TOKENS": "16",
           "MINI_BATCH": "2", "MICRO_BATCH_TOKENS": "4096", "LR": "1e-4", "WARMUP_STEPS": "0",
           "DP": "2"}  # two rollout shards side by side, as on two GPU groups
    return subprocess.run(["bash", str(SCRIPT), str(run), "2"], capture_output=True, text=True,
                          env=env, timeout=1200)


def snapshot(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in sorted(run.rglob("*"))
            if p.is_file()}


@pytest.mark.slow
def test_flagship_example_runs_two_tiny_steps_and_resumes(tiny, tmp_path):
    run = tmp_path / "run"
    first = run_example(run, tiny)
    assert first.returncode == 0, first.stderr[-3000:]

    for step in ("000000", "000001"):
        for name in ("rollouts-0-of-2", "rollouts-1-of-2", "scored"):
            meta = contracts.read_metadata(run / "steps" / step / f"{name}.parquet")
            assert meta["step"] == int(step)
    shards = [contracts.read_table(run / "steps" / "000000" / f"rollouts-{i}-of-2.parquet",
                                   "rollouts") for i in range(2)]
    assert [shard.num_rows for shard in shards] == [2 * 2, 2 * 2]  # 4 prompts x 2, halved
    scored = contracts.read_table(run / "steps" / "000000" / "scored.parquet", "scored")
    assert scored.num_rows == 4 * 2
    # ALGO=dcpo scores with the official three levels (1 / 0 / -1)
    meta = contracts.read_metadata(run / "steps" / "000000" / "scored.parquet")
    assert meta["options"]["no_answer_reward"] == -1
    assert set(scored.column("reward_level").to_pylist()) <= {"correct", "wrong", "no_answer"}
    rollouts = shards[0]
    assert max(len(ids) for ids in rollouts.column("response_token_ids").to_pylist()) <= 16
    ckpts = sorted(p.name for p in (run / "ckpt").iterdir())
    assert ckpts == ["step-000001", "step-000002"]
    state = json.loads((run / "ckpt" / "step-000002" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["rollout_step"] == 1
    assert state["base_model"] == str((tiny / "model").resolve())
    assert json.loads((run / "state.json").read_text())["last_step"] == 1
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [0, 1]
    evals = sorted(p.name for p in (run / "eval").iterdir())
    assert evals == ["step-000000", "step-000002"]
    for label in evals:
        summary = json.loads((run / "eval" / label / "summary.json").read_text())
        assert summary["average"]["problems"] == 4 and "avg@2" in summary["average"]
    assert (run / "report.png").is_file()

    before = snapshot(run)
    summaries = {label: (run / "eval" / label / "summary.json").read_text() for label in evals}
    again = run_example(run, tiny)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already done" in again.stderr and "reused" in again.stdout
    after = snapshot(run)
    assert after.keys() == before.keys()  # nothing new
    changed = [name for name in before if before[name] != after[name]
               and Path(name).name not in REWRITTEN]
    assert changed == []  # nothing redone
    assert {label: (run / "eval" / label / "summary.json").read_text()
            for label in evals} == summaries
