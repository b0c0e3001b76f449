"""`dcpo run` against the shell loop (examples/tiny_loop.sh): the same files from the same
settings, interchangeable mid-run in both directions, resumable after SIGKILL, and its
run.toml refusing a re-run with other settings."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import assert_one_line_error, kill_at_random_progress, run_dcpo
from loop_runs import (
    RUN_FLAGS,
    STEPS,
    assert_same_run,
    dcpo_run,
    finish,
    run_files,
    shell_loop,
    with_tiny_of,
)


@pytest.mark.slow
def test_dcpo_run_writes_the_shell_loops_files(run_reference, shell_reference):
    """Rollouts, scored files, train records, SAS state, weights, optimizer, RNG, metrics
    and evaluations: equal (byte for byte where the files are bytes) to the shell loop's."""
    run_dir = run_reference
    assert_same_run(run_dir, shell_reference)
    config = (run_dir / "run.toml").read_text()
    assert "batch_size = 4" in config and f"steps = {STEPS}" in config


@pytest.mark.slow
def test_rerun_without_flags_is_a_no_op(run_reference, env):
    run_dir = run_reference
    before = run_files(run_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()
              and "eval" not in p.parts}
    finish(dcpo_run(run_dir, None, flags=[]), env)
    assert run_files(run_dir) == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing retrained or rewritten


@pytest.mark.slow
@pytest.mark.parametrize("first", ["dcpo-run", "shell"])
def test_switching_between_dcpo_run_and_the_shell_loop(first, shell_reference, env, tmp_path):
    """The first steps by one, the last by the other: the files of an uninterrupted run."""
    run_dir = with_tiny_of(tmp_path / "run", shell_reference)
    if first == "dcpo-run":
        finish(dcpo_run(run_dir, STEPS - 1), env)
        finish(shell_loop(run_dir, STEPS, env), env)
    else:
        finish(shell_loop(run_dir, STEPS - 1, env), env)
        finish(dcpo_run(run_dir, STEPS), env)
    assert_same_run(run_dir, shell_reference)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(run_reference, env, tmp_path):
    """Killed at random points of its progress (conftest.kill_at_random_progress), then
    resumed without flags."""
    reference_dir = run_reference
    run_dir = tmp_path / "run"
    kills = kill_at_random_progress(dcpo_run(run_dir, STEPS), env, run_dir, reference_dir)
    assert kills >= 2  # really interrupted, more than once
    finish(dcpo_run(run_dir, None, flags=[]), env)  # run.toml holds the settings
    assert_same_run(run_dir, reference_dir)


@pytest.mark.slow
def test_dapo_refill_rounds_are_the_shell_loops(env, shell_reference, tmp_path):
    """--algo dapo: rounds of further prompts until --target-prompts groups are mixed, with
    the files (rollouts-rK, scored-rK) and the training of `ALGO=dapo tiny_loop.sh`."""
    dapo_env = {**env, "ALGO": "dapo", "MAX_ROUNDS": "3"}
    for name in ("shell", "run"):  # the same seed: the reference's tiny task
        with_tiny_of(tmp_path / name, shell_reference)
    finish(shell_loop(tmp_path / "shell", 2, dapo_env), dapo_env)
    finish(dcpo_run(tmp_path / "run", 2, [*RUN_FLAGS, "--algo", "dapo", "--set",
                                          "loop.max_rounds=3"]), dapo_env)
    rounds = sorted(p.name for p in (tmp_path / "run" / "steps").rglob("rollouts-r*.parquet"))
    assert len(rounds) > 2, rounds  # a refill round happened
    assert_same_run(tmp_path / "run", tmp_path / "shell", steps=2)
    config = (tmp_path / "run" / "run.toml").read_text()
    assert "target_prompts = 4" in config and "max_rounds = 3" in config


# ---------------------------------------------------------------- run.toml


def test_a_changed_flag_is_refused_and_nothing_is_written(tmp_path):
    from dcpo_cli.run.config import CONFIG_FILE, default_config, write_config

    run_dir = tmp_path / "run"
    config = default_config()
    config["train"]["lr"] = 1e-3
    write_config(config, run_dir / CONFIG_FILE)
    before = (run_dir / CONFIG_FILE).read_bytes()
    result = run_dcpo("run", run_dir, "--lr", "2e-3", "--steps", "1")
    assert_one_line_error(result, "run.toml", "train.lr = 0.001", "0.002", "--lr")
    assert sorted(p.name for p in run_dir.iterdir()) == [CONFIG_FILE]
    assert (run_dir / CONFIG_FILE).read_bytes() == before
    result = run_dcpo("run", run_dir, "--set", "score.timeout=9")
    assert_one_line_error(result, "score.timeout = 5.0", "9", "--set score.timeout")
    result = run_dcpo("run", run_dir, "--set", "train.no_such=1")
    assert_one_line_error(result, "--set train.no_such", "no such setting")
    assert sorted(p.name for p in run_dir.iterdir()) == [CONFIG_FILE]


@pytest.mark.parametrize("table, line, fragments", [
    ("train", 'lr = "fast"', ["[train] lr", "expected a number", '"fast"']),
    ("rollout", "seed = true", ["[rollout] seed", "expected an integer"]),
    ("loop", "benchmark = [1, 2]", ["[loop] benchmark", "expected a list of strings"]),
    ("engine", 'engine_args = ["x"]', ["[engine] engine_args", "expected a table"]),
    ("train", "lr = -1.0", ["[train] lr must be >= 0"]),
    ("loop", "max_rounds = 0", ["[loop] max_rounds must be at least 1"]),
])
def test_a_bad_value_in_run_toml_names_its_table_and_field(tmp_path, table, line, fragments):
    """A value of the wrong type, or out of range, in run.toml: one line naming run.toml,
    the table and the field (not a command-line flag, not a TypeError), exit 2, nothing
    written."""
    from dcpo_cli.run.config import CONFIG_FILE, default_config, write_config

    run_dir = tmp_path / "run"
    write_config(default_config(), run_dir / CONFIG_FILE)
    path = run_dir / CONFIG_FILE
    text = path.read_text()
    name = line.split(" = ")[0]
    start = text.index(f"[{table}]")
    head, tail = text[:start], text[start:]
    kept = [row for row in tail.splitlines() if not row.startswith(f"{name} = ")]
    path.write_text(head + "\n".join([kept[0], line, *kept[1:]]) + "\n")
    before = path.read_bytes()
    result = run_dcpo("run", run_dir, "--steps", "1")
    assert_one_line_error(result, str(path), *fragments)
    assert "--" not in result.stderr.split(str(path))[1]  # no flag named
    assert sorted(p.name for p in run_dir.iterdir()) == [CONFIG_FILE]
    assert path.read_bytes() == before


@pytest.mark.slow
def test_a_set_value_of_the_wrong_type_is_one_line(tmp_path):
    result = run_dcpo("run", tmp_path / "run", "--set", "train.lr=fast", "--steps", "1")
    assert_one_line_error(result, "--set train.lr=fast", "expected a number")
    result = run_dcpo("run", tmp_path / "run", "--set", "train.lr=-1", "--steps", "1")
    # from the command line: the words of the option that set it
    assert_one_line_error(result, "--set train.lr: must be >= 0")
    result = run_dcpo("run", tmp_path / "run", "--lr", "-1", "--steps", "1")
    assert_one_line_error(result, "--lr must be >= 0")
    result = run_dcpo("run", tmp_path / "run", "--eval-at", "-1", "--steps", "1")
    assert_one_line_error(result, "--eval-at must be >= 0")
    assert not (tmp_path / "run").exists()


def test_every_default_setting_has_its_declared_type():
    from dcpo_cli.run.config import default_config, type_error

    config = default_config()
    assert {(s, k): type_error(s, k, v) for s in config for k, v in config[s].items()
            if type_error(s, k, v)} == {}


def test_config_round_trips_every_stage_option(tmp_path):
    """run.toml holds every field of every stage's options (new fields included, read
    generically) and reads back to the same options."""
    import dataclasses

    from dcpo_cli.run.config import (
        CONFIG_FILE,
        FIXED,
        SECTIONS,
        default_config,
        read_config,
        stage_options,
        write_config,
    )

    config = default_config()
    config["train"]["overrides"] = {"clip": "fixed", "eps_high": 0.28}
    config["engine"]["engine_args"] = {"kv_cache_memory_bytes": 1 << 26, "x": "a\"b\\c"}
    config["eval"]["pass_at"] = [1, 2]
    write_config(config, tmp_path / CONFIG_FILE)
    assert read_config(tmp_path / CONFIG_FILE) == config
    for section, cls in SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)} - {n for s, n in FIXED if s == section}
        assert set(config[section]) == fields
        options = stage_options(config, section)
        assert isinstance(options, cls)
    assert stage_options(config, "engine").engine_args == (("kv_cache_memory_bytes", 1 << 26),
                                                           ("x", "a\"b\\c"))


def test_steps_may_change_and_unset_flags_come_from_the_file(tmp_path):
    from dcpo_cli.run.config import CONFIG_FILE, resolve, write_config

    config, write = resolve(tmp_path, {"steps": 2, "lr": 1e-3}, {})
    assert write and config["loop"]["steps"] == 2 and config["train"]["lr"] == 1e-3
    assert config["rollout"]["batch_size"] == 32  # the shell loop's default
    write_config(config, tmp_path / CONFIG_FILE)
    again, write = resolve(tmp_path, {}, {})
    assert again == config and not write
    more, write = resolve(tmp_path, {"steps": 5, "lr": 0.001}, {})
    assert write and more["loop"]["steps"] == 5


def test_dapo_runs_refill_to_the_batch_size_unless_told_otherwise(tmp_path):
    from dcpo_cli.run.config import refills, resolve

    dapo, _ = resolve(tmp_path, {"algo": "dapo", "batch_size": 6}, {})
    assert refills(dapo) and dapo["train"]["target_prompts"] == 6
    assert dapo["loop"]["max_rounds"] == 4 and dapo["score"]["no_answer_reward"] is None
    told, _ = resolve(tmp_path, {"algo": "dapo"}, {("train", "target_prompts"): 8})
    assert told["train"]["target_prompts"] == 8
    dcpo, _ = resolve(tmp_path, {}, {})
    assert not refills(dcpo) and dcpo["train"]["target_prompts"] is None
    # the filter switched on in another preset refills too
    grpo, _ = resolve(tmp_path, {"algo": "grpo"},
                      {("train", "overrides"): {"drop_uniform_groups": True}})
    assert refills(grpo) and grpo["train"]["target_prompts"] == 32


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_three_epochs_of_dcpo_run_finish_with_distinct_prompts_per_step(tmp_path, env, tiny,
                                                                      seed):
    """Issue 28: a run past the epoch boundary used to die when a step drew a prompt twice.
    10 prompts of 4 per step: 2 steps an epoch (2 prompts sit each one out), 6 steps."""
    from dcpo_cli.stages.rollout import select_prompts

    prompts = tmp_path / "ten.parquet"
    pq.write_table(pq.read_table(tiny / "train.parquet").slice(0, 10), prompts)
    ids = pq.read_table(prompts).column("prompt_id").to_pylist()
    run_dir = tmp_path / "run"
    finish(dcpo_run(run_dir, 6, ["--model", str(tiny / "model"), "--prompts", str(prompts),
                                 "--batch-size", "4", "--n", "2", "--max-new-tokens", "8",
                                 "--seed", str(seed), "--reward", "loop_reward:parity"]), env)
    times: dict[str, int] = {}
    for step in range(6):
        drawn = pq.read_table(run_dir / "steps" / f"{step:06d}" / "rollouts.parquet")
        expected = {ids[i] for i in select_prompts(10, 4, step, seed)}
        assert set(drawn.column("prompt_id").to_pylist()) == expected and len(expected) == 4
        for prompt_id in expected:
            times[prompt_id] = times.get(prompt_id, 0) + 1
    state = json.loads((run_dir / "state.json").read_text())
    assert state["last_step"] == 5
    assert {p: s["times"] for p, s in state["prompts"].items()} == times
    assert max(times.values()) <= 3  # once an epoch at most
