"""The shell loop end to end: examples/tiny_loop.sh (conftest's shell_reference), SIGKILL at
random moments and resume to bit-identical weights and SAS state, `dcpo report` on the run,
and the example scripts using only options the CLI has."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, kill_at_random_progress, run_dcpo
from loop_runs import LOOP_ENV, STEPS, finish, shell_loop


def final_files(run_dir: Path) -> dict[str, bytes]:
    ckpt = run_dir / "ckpt" / f"step-{STEPS:06d}"
    return {"weights": (ckpt / "model.safetensors").read_bytes(),
            "state": (run_dir / "state.json").read_bytes()}


@pytest.mark.slow
def test_the_loop_end_to_end(shell_reference, tmp_path):
    """conftest's shell_reference: loop_runs.STEPS steps of the reduced loop."""
    run_dir = shell_reference
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(STEPS))
    assert all(r["responses"] == 16 for r in records)
    assert all(r["grad_norm"] > 0 and 0 < r["reward_mean"] < 1 for r in records)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["last_step"] == STEPS - 1
    for step in range(STEPS):
        for name in ("rollouts", "scored"):
            assert (run_dir / "steps" / f"{step:06d}" / f"{name}.parquet").is_file()
    for label in ("step-000000", f"step-{STEPS:06d}"):
        summary = json.loads((run_dir / "eval" / label / "summary.json").read_text())
        scores = summary["test"]  # the benchmark is named after the file stem
        assert {"avg@1", "avg@2", "pass@2", "maj@2"} <= scores.keys()

    report_dir = tmp_path / "run"  # `dcpo report` writes into the run: a copy of the shared one
    shutil.copytree(run_dir, report_dir)
    result = run_dcpo("report", report_dir)
    assert result.code == 0, result.stderr
    assert (report_dir / "report.png").stat().st_size > 10_000
    assert "TCR" in result.stdout and "avg@2" in result.stdout


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(shell_reference, env,
                                                                tmp_path):
    """Killed at random points of its progress (conftest.kill_at_random_progress), then run
    again to the end."""
    reference_dir = shell_reference
    run_dir = tmp_path / "run"
    kills = kill_at_random_progress(shell_loop(run_dir, STEPS, env), env, run_dir,
                                    reference_dir)
    assert kills >= 2  # the loop was really interrupted, more than once
    finish(shell_loop(run_dir, STEPS, env), env)
    assert final_files(run_dir) == final_files(reference_dir)
    records = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in records] == list(range(STEPS))


# ---------------------------------------------------------------- the example scripts


def script_calls(path: Path) -> list[tuple[str, list[str]]]:
    """(subcommand, options) for every `$DCPO <cmd> ...` call, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    calls = []
    for match in re.finditer(r"\$DCPO ([a-z-]+(?: init)?)([^\n;|&]*)", text):
        calls.append((match.group(1), re.findall(r"(?<!\S)(--[a-z][a-z-]*)", match.group(2))))
    return calls


@pytest.mark.parametrize("script", ["tiny_loop.sh", "demo.sh", "qwen2.5-math-7b.sh"])
def test_example_scripts_use_only_existing_options(script):
    import typer.main

    from dcpo_cli.cli import app

    root = typer.main.get_command(app)
    calls = script_calls(REPO / "examples" / script)
    assert calls or script == "demo.sh"
    for name, options in calls:
        command = root
        for part in name.split():
            command = command.commands[part]
        known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
        unknown = sorted(set(options) - known)
        assert not unknown, f"{script}: dcpo {name} has no option(s) {unknown}"


# ---------------------------------------------------------------- DAPO refill in the loop

# Only about a third of the prompts can get mixed outcomes (the rest are all wrong), so a
# 4-prompt round rarely keeps the 2-group target by itself.
SPARSE_REWARD = ("def sparse(response_text, answer, row):\n"
                 "    if sum(map(ord, row['prompt_id'])) % 3:\n"
                 "        return 0.0\n"
                 "    return float(len(response_text) % 2)\n")


@pytest.mark.slow
def test_dapo_loop_refills_a_step_to_exactly_the_target(tmp_path):
    from dcpo_cli.files import contracts

    (tmp_path / "sparse_reward.py").write_text(SPARSE_REWARD)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **LOOP_ENV, "ALGO": "dapo", "TARGET": "2", "MAX_ROUNDS": "8",
           "REWARD": "sparse_reward:sparse", "PYTHONPATH": path}
    run_dir = tmp_path / "run"
    result = subprocess.run(["bash", str(REPO / "examples" / "tiny_loop.sh"), str(run_dir), "1"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    step = run_dir / "steps" / "000000"
    rounds = sorted(step.glob("scored-r*.parquet"))
    kept = [contracts.read_metadata(p)["mixed_groups"] for p in rounds]
    assert len(rounds) >= 2 and kept[0] < 2  # the first round fell short: more rounds ran
    assert sum(kept[:-1]) < 2 <= sum(kept)  # and they stopped once the target was met
    assert [contracts.read_metadata(p)["round"] for p in rounds] == list(range(len(rounds)))
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["groups_trained"] == 2  # exactly the target
    assert metrics["groups_generated"] == 4 * len(rounds)
    assert metrics["groups_kept"] == sum(kept)
    assert "warning" not in result.stderr
