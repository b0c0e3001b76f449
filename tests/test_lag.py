"""Rollouts of an older policy (docs/design.md 1.4c): the sampling policy's step recorded by
rollout and carried by score, train-step's staleness check (--max-staleness) and its
`staleness` in metrics and records, and `LAG=1 examples/tiny_loop.sh` writing the same files
as the lag-1 schedule run one stage after another."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from builders import write_rollouts, write_scored
from conftest import assert_one_line_error, kill_at_random_progress, run_dcpo
from loop_runs import RUN_FLAGS, assert_same_run, dcpo_run, finish, shell_loop

from dcpo_cli.files import contracts
from dcpo_cli.run.config import read_config

REWARDS_0 = {"p0": [1, 0, 0, 1], "p1": [0, 0, 0, 1], "p2": [1, 1, 0, 1], "p3": [0, 1, 0, 0]}
REWARDS_1 = {"p0": [1, 0, 1, 1], "p1": [0, 0, 1, 0], "p2": [1, 0, 1, 1], "p3": [0, 1, 1, 0]}
FAST = ["--lr", "1e-3", "--warmup-steps", "0", "--micro-batch-tokens", "256"]


def sampled_by(path: Path, step: int, model: str = "ckpt-x") -> Path:
    """Rewrite a file's metadata as if the checkpoint of train step `step` had sampled it:
    rollouts record `policy_step` and `model`, scored files `policy_step`, `policy_model`."""
    table = contracts.read_parquet(path)
    meta = contracts.read_metadata(path)
    if meta["kind"] == "rollouts":
        meta.update(policy_step=step, model=model)
    else:
        meta.update(policy_step=step, policy_model=model)
    contracts.write_table(table.replace_schema_metadata({}), path, meta)
    return path


@pytest.fixture(scope="module")
def tokenizer(random_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(random_model_dir)


def fake_checkpoint(random_model_dir: Path, folder: Path, global_step: int) -> Path:
    """The base weights under a trainer state of `global_step` (enough for the staleness
    check, which runs before anything is loaded)."""
    shutil.copytree(random_model_dir, folder)
    (folder / "trainer_state.json").write_text(json.dumps(
        {"format": "dcpo-trainer-state", "version": 2, "global_step": global_step}))
    return folder


# ---------------------------------------------------------------- the record


@pytest.mark.slow
def test_score_carries_the_sampling_policy_and_refuses_mixed_shards(tmp_path):
    answers = ["1", "2", "3", "4"]
    first = sampled_by(write_rollouts(tmp_path / "a.parquet", ["\\boxed{1}"] * 4, answers), 2,
                       "run/ckpt/step-000002")
    result = run_dcpo("score", first, "--out", tmp_path / "s.parquet")
    assert result.code == 0, result.stderr
    meta = contracts.read_metadata(tmp_path / "s.parquet")
    assert (meta["policy_step"], meta["policy_model"]) == (2, "run/ckpt/step-000002")

    second = sampled_by(write_rollouts(tmp_path / "b.parquet", ["x"] * 4, answers, start=4), 3)
    mixed = run_dcpo("score", first, second, "--out", tmp_path / "m.parquet")
    assert_one_line_error(mixed, "a.parquet: step 2", "b.parquet: step 3", "different policies")
    assert not (tmp_path / "m.parquet").exists()

    older = write_rollouts(tmp_path / "c.parquet", ["x"] * 4, answers)  # no policy recorded
    assert run_dcpo("score", older, "--out", tmp_path / "o.parquet").code == 0
    assert contracts.read_metadata(tmp_path / "o.parquet")["policy_step"] is None


# ---------------------------------------------------------------- the refusals


@pytest.mark.parametrize(("model_step", "policy_step", "limit", "fragments"), [
    (2, 0, 1, ("sampled by ckpt-x (step 0), 2 steps behind --model", "(step 2)",
               "--max-staleness is 1")),
    (1, 0, 0, ("1 step behind --model", "--max-staleness is 0")),  # the default catches it
    (0, 1, 3, ("sampled by ckpt-x (step 1), newer than --model", "(step 0)")),
])
@pytest.mark.slow
def test_train_step_refuses_rollouts_beyond_the_allowed_staleness(
        tmp_path, random_model_dir, tokenizer, model_step, policy_step, limit, fragments):
    model = fake_checkpoint(random_model_dir, tmp_path / "ckpt", model_step) if model_step \
        else random_model_dir
    scored = sampled_by(write_scored(tmp_path / "scored.parquet", tokenizer, 0, REWARDS_0),
                        policy_step)
    out, state, log = tmp_path / "out", tmp_path / "state.json", tmp_path / "metrics.jsonl"
    result = run_dcpo("train-step", "--model", model, "--scored", scored, "--state", state,
                      "--out", out, "--metrics-log", log, "--max-staleness", limit, *FAST)
    assert_one_line_error(result, "scored.parquet", str(model), *fragments)
    assert not out.exists() and not state.exists() and not log.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_negative_max_staleness_is_refused(tmp_path, random_model_dir, tokenizer):
    scored = write_scored(tmp_path / "scored.parquet", tokenizer, 0, REWARDS_0)
    result = run_dcpo("train-step", "--model", random_model_dir, "--scored", scored, "--state",
                      tmp_path / "s.json", "--out", tmp_path / "out", "--max-staleness", "-1")
    assert_one_line_error(result, "--max-staleness must be >= 0")


# ---------------------------------------------------------------- within the limit


@pytest.mark.slow
def test_a_stale_step_trains_with_tis_and_reports_its_staleness(tmp_path, random_model_dir,
                                                                tokenizer):
    """Step 0 on policy from the base model; step 1 trains checkpoint 1 on rollouts the base
    model sampled (staleness 1): accepted with --max-staleness 1, corrected by tis (auto),
    `staleness` in the metrics log, the checkpoint's metrics and every record. Scored files
    without the record (older ones) train as before, with staleness null."""
    state, log = tmp_path / "state.json", tmp_path / "metrics.jsonl"
    scored_0 = sampled_by(write_scored(tmp_path / "s0.parquet", tokenizer, 0, REWARDS_0), 0,
                          str(random_model_dir))
    ckpt_1, ckpt_2 = tmp_path / "ckpt-1", tmp_path / "ckpt-2"
    assert run_dcpo("train-step", "--model", random_model_dir, "--scored", scored_0, "--state",
                    state, "--out", ckpt_1, "--metrics-log", log, *FAST).code == 0
    scored_1 = sampled_by(write_scored(tmp_path / "s1.parquet", tokenizer, 1, REWARDS_1), 0,
                          str(random_model_dir))
    result = run_dcpo("train-step", "--model", ckpt_1, "--scored", scored_1, "--state", state,
                      "--out", ckpt_2, "--metrics-log", log, "--max-staleness", "1", *FAST)
    assert result.code == 0, result.stderr
    metrics = [json.loads(line) for line in log.read_text().splitlines()]
    assert [m["staleness"] for m in metrics] == [0, 1]
    assert json.loads((ckpt_2 / "metrics.json").read_text())["staleness"] == 1
    trainer = [json.loads((c / "trainer_state.json").read_text()) for c in (ckpt_1, ckpt_2)]
    assert [t["options"]["rollout_correction"] for t in trainer] == ["none", "tis"]
    records = [pa.parquet.read_table(c / "train_records.parquet").to_pydict()
               for c in (ckpt_1, ckpt_2)]
    assert set(records[0]["staleness"]) == {0} and set(records[1]["staleness"]) == {1}
    assert set(records[0]["rollout_weight_mean"]) == {1.0}
    # the builder's sampler log-probs (-1 per token) are not the trainer's: real weights,
    # none above the cap
    assert any(w != 1.0 for w in records[1]["rollout_weight_mean"])
    assert all(0 < w <= 2.0 for w in records[1]["rollout_weight_mean"])

    unrecorded = write_scored(tmp_path / "old.parquet", tokenizer, 2, REWARDS_0)
    result = run_dcpo("train-step", "--model", ckpt_2, "--scored", unrecorded, "--state", state,
                      "--out", tmp_path / "ckpt-3", "--metrics-log", log, *FAST)
    assert result.code == 0, result.stderr
    assert json.loads(log.read_text().splitlines()[-1])["staleness"] is None
    table = pa.parquet.read_table(tmp_path / "ckpt-3" / "train_records.parquet")
    assert table.column("staleness").null_count == table.num_rows


# ---------------------------------------------------------------- the lag-1 loop


def lag_schedule(run_dir: Path, steps: int, env: dict[str, str]) -> None:
    """The lag-1 schedule of `LAG=1 examples/tiny_loop.sh`, one stage after another: step
    s+1's rollout and score (from checkpoint s) before train-step s, each step trained by its
    own checkpoint. The flags are the loop's, from the same LOOP_ENV."""
    tiny = run_dir / "tiny"

    def dcpo(*args) -> None:
        result = subprocess.run([sys.executable, "-m", "dcpo_cli", *map(str, args)], env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]

    def checkpoint(step: int) -> Path:
        return tiny / "model" if step == 0 else run_dir / "ckpt" / f"step-{step:06d}"

    def evaluate(model: Path, label: str) -> None:
        dcpo("eval", "--model", model, "--benchmark", tiny / "test.parquet", "--avg-at",
             env["EVAL_AT"], "--max-new-tokens", env["MAX_NEW_TOKENS"], "--seed", env["SEED"],
             "--engine", "hf", "--out", run_dir / "eval" / label)

    def sample(model: Path, step: int) -> None:
        folder = run_dir / "steps" / f"{step:06d}"
        folder.mkdir(parents=True)
        dcpo("rollout", "--model", model, "--prompts", tiny / "train.parquet", "--step", step,
             "--round", 0, "--batch-size", env["BATCH"], "--n", env["N"], "--temperature",
             "1.0", "--max-new-tokens", env["MAX_NEW_TOKENS"], "--seed", env["SEED"],
             "--engine", "hf", "--out", folder / "rollouts.parquet")
        dcpo("score", folder / "rollouts.parquet", "--out", folder / "scored.parquet",
             "--reward", env["REWARD"])

    dcpo("tiny", "init", tiny, "--seed", env["SEED"], "--size", env["TINY_SIZE"])
    evaluate(tiny / "model", "step-000000")
    sample(checkpoint(0), 0)
    for step in range(steps):
        if step + 1 < steps:
            sample(checkpoint(step), step + 1)
        dcpo("train-step", "--model", checkpoint(step), "--scored",
             run_dir / "steps" / f"{step:06d}" / "scored.parquet", "--state",
             run_dir / "state.json", "--out", checkpoint(step + 1), "--algo", "dcpo", "--lr",
             env["LR"], "--warmup-steps", 0, "--seed", env["SEED"], "--metrics-log",
             run_dir / "metrics.jsonl", "--max-staleness", 1)
    evaluate(checkpoint(steps), f"step-{steps:06d}")


# Step 0 fresh, then two steady-state steps: each trains on rollouts of the checkpoint before.
LAG_STEPS = 3


@pytest.fixture(scope="module")
def one_thread_env(env) -> dict[str, str]:
    """Every process at one torch thread: `dcpo run --max-staleness 1` gives its trainer and
    its generation worker one thread each on this 2-core machine (or OMP_NUM_THREADS each),
    and float sums split over threads differ in their last bits (docs/loop.md)."""
    return {**env, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def lag_shell(tmp_path_factory, one_thread_env) -> Path:
    """`LAG=1 examples/tiny_loop.sh` for LAG_STEPS steps."""
    shell = tmp_path_factory.mktemp("lag") / "shell"
    finish(shell_loop(shell, LAG_STEPS, one_thread_env), {**one_thread_env, "LAG": "1"})
    return shell


@pytest.mark.slow
def test_lag_1_shell_loop_writes_the_lag_1_schedules_files(tmp_path, lag_shell,
                                                           one_thread_env):
    staged = tmp_path / "staged"
    lag_schedule(staged, LAG_STEPS, one_thread_env)
    assert_same_run(lag_shell, staged, LAG_STEPS)
    metrics = [json.loads(line) for line in (lag_shell / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["staleness"] for m in metrics] == [0] + [1] * (LAG_STEPS - 1)
    policies = [contracts.read_metadata(lag_shell / "steps" / f"{s:06d}" / "scored.parquet")
                ["policy_step"] for s in range(LAG_STEPS)]
    assert policies == [0, *range(LAG_STEPS - 1)]  # step s sampled by checkpoint s - 1
    corrections = [json.loads((lag_shell / "ckpt" / f"step-{s:06d}" / "trainer_state.json")
                              .read_text())["options"]["rollout_correction"]
                   for s in range(1, LAG_STEPS + 1)]
    assert corrections == ["none"] + ["tis"] * (LAG_STEPS - 1)


def lag_run(run_dir: Path) -> list[str]:
    return dcpo_run(run_dir, LAG_STEPS, [*RUN_FLAGS, "--max-staleness", "1"])


@pytest.mark.slow
def test_dcpo_run_max_staleness_1_writes_the_lag_1_loops_files(tmp_path, lag_shell,
                                                              one_thread_env):
    """Generation overlapped with training in dcpo run: the files of the same schedule run
    by the shell loop (wall-clock fields aside); run.toml keeps the lag."""
    run_dir = tmp_path / "run"
    finish(lag_run(run_dir), one_thread_env)
    assert_same_run(run_dir, lag_shell, LAG_STEPS)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["staleness"] for m in metrics] == [0] + [1] * (LAG_STEPS - 1)
    assert read_config(run_dir / "run.toml")["train"]["max_staleness"] == 1


@pytest.mark.slow
def test_an_overlapped_run_killed_at_random_points_resumes_to_the_same_files(
        tmp_path, lag_shell, one_thread_env):
    """SIGKILL while both sides work (trainer and generation worker), then the same command:
    the same end state, nothing absorbed twice (the SAS state and metrics are compared)."""
    run_dir = tmp_path / "run"
    kills = kill_at_random_progress(lag_run(run_dir), one_thread_env, run_dir, lag_shell,
                                    seed=33)
    assert kills >= 1
    finish(lag_run(run_dir), one_thread_env)
    assert_same_run(run_dir, lag_shell, LAG_STEPS)
