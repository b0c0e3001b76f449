"""`dcpo run --nproc-per-node 2` (gloo, CPU) against the shell loop with `train-step
--nproc-per-node 2` (the same files, byte for byte, at the same torch thread count) and
against the one-process `dcpo run` (the same tokens, rewards and SAS state; weights and
log-probs within 1e-5), bad inputs, and the engines' data-parallel shares."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_one_line_error, run_dcpo
from loop_runs import (
    RUN_FLAGS,
    STEPS,
    assert_same_run,
    dcpo_run,
    finish,
    rank_pids,
    run_files,
    shell_loop,
    with_tiny_of,
)

# Measure the run, not the update: the world size (by design) and float sums over ranks
APPROX = 1e-5


@pytest.fixture(scope="module")
def rank_env(env) -> dict[str, str]:
    """The loop's environment at one torch thread count for every process. A CPU float
    reduction big enough to be split across threads is summed in one chunk per thread, so
    its last bits depend on the count: the launcher gives each of the 2 ranks cores / 2
    threads (OMP_NUM_THREADS) while a one-process stage of the shell loop (rollout, eval)
    would use every core, and the sampler's log-probs (response_logprobs, then
    mismatch_logprob_diff) would differ in the last bits (tokens, weights and the training
    state do not). Pinned here for both runs: the same computation, the same bytes."""
    threads = env.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // 2))
    return {**env, "OMP_NUM_THREADS": threads}


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory, rank_env):
    run_dir = tmp_path_factory.mktemp("parallel") / "run"
    finish(dcpo_run(run_dir, STEPS) + ["--nproc-per-node", "2"], rank_env)
    return run_dir


@pytest.mark.slow
def test_two_ranks_write_the_shell_loops_files(parallel_run, tmp_path, rank_env):
    """The shell loop with train-step on 2 processes, at the ranks' thread count (rank_env):
    everything equal, byte for byte."""
    shell = with_tiny_of(tmp_path / "shell", parallel_run)
    finish(shell_loop(shell, STEPS, rank_env), {**rank_env, "TRAIN_PROCS": "2"})
    assert_same_run(parallel_run, shell)


@pytest.mark.slow
def test_two_ranks_match_one_process(parallel_run, run_reference):
    ours, theirs = run_files(parallel_run), run_files(run_reference)
    assert ours["state"] == theirs["state"]  # SAS state, byte for byte
    for step in range(STEPS):
        for name in ("rollouts", "scored"):
            a, b = ours[f"{step}/{name}"]["rows"], theirs[f"{step}/{name}"]["rows"]
            assert a.keys() == b.keys()
            for column in a:
                if column == "response_logprobs":
                    worst = max(abs(x - y) for r, s in zip(a[column], b[column], strict=True)
                                for x, y in zip(r, s, strict=True))
                    assert worst <= APPROX, (step, worst)
                else:
                    assert a[column] == b[column], (step, name, column)
        from safetensors.torch import load

        wa = load(ours[f"{step}/model.safetensors"])
        wb = load(theirs[f"{step}/model.safetensors"])
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= APPROX
        ma, mb = ours[f"{step}/metrics.json"], theirs[f"{step}/metrics.json"]
        assert (ma.pop("world_size"), mb.pop("world_size")) == (2, 1)
        assert ma.keys() == mb.keys()
        for key in ma:
            if isinstance(ma[key], float):
                assert ma[key] == pytest.approx(mb[key], rel=APPROX, abs=1e-6), key
            else:
                assert ma[key] == mb[key], key


def test_generate_parts_merge_into_generate(random_model_dir):
    """Each engine's shares, merged, are `generate` itself: the same tokens and log-probs
    (a small token budget, so the hf engine has several batches to deal out)."""
    from dcpo_cli.engines.base import SamplingSettings, merge_parts
    from dcpo_cli.engines.hf import HFEngine

    engine = HFEngine(random_model_dir, token_budget=64)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12], [13, 14]]
    settings = SamplingSettings(n=3, max_new_tokens=6, seed=11)
    whole = engine.generate(prompts, settings)
    for count in (2, 3):
        parts = [engine.generate_part(prompts, settings, (i, count)) for i in range(count)]
        assert sum(c is not None for part in parts[:1] for g in part for c in g) < 15
        merged = merge_parts(parts)
        assert [[(c.token_ids, c.logprobs) for c in g] for g in merged] == \
            [[(c.token_ids, c.logprobs) for c in g] for g in whole]
    torch.manual_seed(0)


def test_share_covers_every_item_once():
    from dcpo_cli.engines.base import share

    for count in range(0, 9):
        for parts in range(1, 5):
            items = [i for p in range(parts) for i in share(count, (p, parts))]
            assert items == list(range(count))


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--nproc-per-node", "64"], "this machine can run"),
    (["--nproc-per-node", "2", "--batch-size", "3"], "does not split across 2 engine groups"),
    (["--nproc-per-node", "2", "--nnodes", "2"], "needs --master-addr"),
    (["--nnodes", "2"], "--nnodes goes with --nproc-per-node"),
])
@pytest.mark.slow
def test_bad_launches_are_refused_before_anything_is_written(tmp_path, flags, fragment):
    run_dir = tmp_path / "run"
    args = [a for a in RUN_FLAGS]
    if "--batch-size" in flags:
        index = args.index("--batch-size")
        del args[index:index + 2]
    result = run_dcpo("run", run_dir, "--steps", "1", *args, *flags)
    assert_one_line_error(result, fragment)
    assert not run_dir.exists()


def test_tensor_parallel_must_divide_the_processes():
    from dcpo_cli.errors import DcpoError
    from dcpo_cli.run.colocated import check_world

    with pytest.raises(DcpoError, match="does not divide the 3 processes"):
        check_world(3, 2, 8, 4, None)
    check_world(4, 2, 8, 4, None)  # 2 engine groups of 2 ranks, 4 prompts each
    with pytest.raises(DcpoError, match="cannot be split across 8 processes"):
        check_world(8, 1, 8, 1, 1)


def test_first_failure_line_names_the_killed_rank(tmp_path):
    from types import SimpleNamespace

    from dcpo_cli.parallel.torchrun import first_failure_line

    failures = {0: SimpleNamespace(exitcode=1, timestamp=5),
                1: SimpleNamespace(exitcode=-9, timestamp=6)}
    line = first_failure_line(failures, tmp_path / "error", "dcpo run")
    assert line.startswith("dcpo run: rank 1 died (killed by SIGKILL)")
    (tmp_path / "error.rank0").write_text("unexpected RuntimeError: boom\n")
    failures[1] = SimpleNamespace(exitcode=-15, timestamp=6)  # stopped by torchrun
    assert "rank 0 died (unexpected RuntimeError: boom)" in first_failure_line(
        failures, tmp_path / "error", "dcpo run")


@pytest.mark.slow
def test_a_rank_dying_mid_step_is_one_line_and_the_rerun_ends_the_same(parallel_run, tmp_path,
                                                                       rank_env):
    run_dir = with_tiny_of(tmp_path / "run", parallel_run)
    command = dcpo_run(run_dir, STEPS) + ["--nproc-per-node", "2"]
    import subprocess

    # rank 1 exits in the middle of step 0's second optimizer update
    died = subprocess.run(command, env={**rank_env, "DCPO_TEST_KILL_AT": "1:2"},
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in died.stderr.splitlines() if line.startswith("error:")]
    assert died.returncode == 2, died.stderr[-2000:]
    assert len(lines) == 1 and "rank 1 died (exit code 137)" in lines[0], died.stderr[-2000:]
    assert "Traceback" not in died.stderr
    assert not (run_dir / "ckpt").exists() and not (run_dir / "state.json").exists()
    assert (run_dir / "steps" / "000000" / "scored.parquet").is_file()  # committed before
    finish(command, rank_env)
    assert_same_run(run_dir, parallel_run)


@pytest.mark.slow
def test_sigkill_of_one_rank_at_random_progress_then_rerun(parallel_run, tmp_path,
                                                          rank_env):
    """SIGKILL of rank 0 or 1 (not the launcher) after a random number of the reference
    run's files have appeared, then the same command: the same end state."""
    import os
    import random
    import signal
    import subprocess
    import time

    run_dir = tmp_path / "run"
    command = dcpo_run(run_dir, STEPS) + ["--nproc-per-node", "2"]
    rng = random.Random(22)
    total = sum(1 for _ in parallel_run.rglob("*"))
    kills = 0
    for threshold in sorted(rng.sample(range(total // 4, total), 2)):
        process = subprocess.Popen(command, env=rank_env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        while process.poll() is None and sum(1 for _ in run_dir.rglob("*")) < threshold:
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 0.3))
        pids = rank_pids(process.pid, str(rng.randrange(2)))
        if process.poll() is None and pids:
            os.kill(pids[0], signal.SIGKILL)
            kills += 1
        _, stderr = process.communicate(timeout=900)
        if kills and process.returncode != 0:
            assert process.returncode == 2, stderr[-2000:]
            assert "died (killed by SIGKILL)" in stderr, stderr[-2000:]
    assert kills >= 1
    finish(command, rank_env)
    assert_same_run(run_dir, parallel_run)
