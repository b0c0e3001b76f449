"""Exclusive use of RUN_DIR and of train-step's output and state (dcpo_cli/files/locks.py):
a second user is refused at once with one line naming the holder; a lock left by a killed
process never blocks; locks are reentrant in a process and taken by rank 0 only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import assert_one_line_error, run_dcpo

from dcpo_cli.errors import DcpoError
from dcpo_cli.files.locks import exclusive, lock_file

HOLD = ("import sys\nfrom dcpo_cli.files.locks import exclusive\n"
        "with exclusive(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n")


def hold_in_child(path):
    """A process holding `path`'s lock until its stdin closes (or it is killed)."""
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"  # waits for the event, not for time
    return child


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    child = hold_in_child(tmp_path / "run")
    try:
        with pytest.raises(DcpoError, match=rf"run: in use by pid {child.pid} on "), \
                exclusive(tmp_path / "run"):
            pass
    finally:
        child.communicate("")
    with exclusive(tmp_path / "run"):  # released when the holder ends
        pass
    assert not lock_file(tmp_path / "run").exists()  # a clean exit removes the file


def test_a_lock_left_by_a_killed_process_never_blocks(tmp_path):
    child = hold_in_child(tmp_path / "state.json")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert lock_file(tmp_path / "state.json").exists()  # the file stays, the lock does not
    with exclusive(tmp_path / "state.json"):
        pass


def test_locks_are_reentrant_in_a_process(tmp_path):
    with exclusive(tmp_path / "run"):
        with exclusive(tmp_path / "run", tmp_path / "run" / "ckpt"):
            pass
        assert lock_file(tmp_path / "run").exists()  # still held by the outer block
        child = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path / "run")],
                               input="", capture_output=True, text=True)
        assert child.returncode == 1 and "in use by" in child.stderr
    assert not lock_file(tmp_path / "run").exists()


def test_only_rank_zero_takes_locks(tmp_path, monkeypatch):
    child = hold_in_child(tmp_path / "out")
    try:
        monkeypatch.setenv("RANK", "1")
        with exclusive(tmp_path / "out"):  # rank 1 of a job whose rank 0 holds it
            pass
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("DCPO_LOCKS_HELD", "1")  # a rank started by --nproc-per-node
        with exclusive(tmp_path / "out"):
            pass
        monkeypatch.delenv("DCPO_LOCKS_HELD")
        with pytest.raises(DcpoError), exclusive(tmp_path / "out"):
            pass
    finally:
        child.communicate("")


def test_dcpo_run_on_a_run_dir_in_use_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    child = hold_in_child(run_dir)
    try:
        result = run_dcpo("run", run_dir, "--tiny-size", "test", "--steps", "1")
    finally:
        child.communicate("")
    assert_one_line_error(result, str(run_dir), f"in use by pid {child.pid}")
    assert not run_dir.exists()


@pytest.mark.parametrize("held", ["out", "state"])
@pytest.mark.slow
def test_train_step_on_an_output_or_state_in_use_is_refused(tmp_path, held,
                                                           random_model_dir):
    paths = {"out": tmp_path / "ckpt", "state": tmp_path / "state.json"}
    scored = tmp_path / "scored.parquet"
    scored.write_bytes(b"")  # never read: the lock is taken first
    child = hold_in_child(paths[held])
    try:
        result = run_dcpo("train-step", "--model", random_model_dir, "--scored", scored,
                          "--state", paths["state"], "--out", paths["out"])
        relaunched = run_dcpo("train-step", "--model", random_model_dir, "--scored", scored,
                              "--state", paths["state"], "--out", paths["out"],
                              "--nproc-per-node", "2")
    finally:
        child.communicate("")
    for outcome in (result, relaunched):
        assert_one_line_error(outcome, str(paths[held]), "in use by pid")
    assert not paths["out"].exists() and not paths["state"].exists()
