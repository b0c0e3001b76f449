"""`dcpo study` and its report: a study killed mid-run resumes as a whole, its report's
table is the runs' own metrics reduced over seeds, a one-run study writes the files of the
same `dcpo run`, and bad input stops it before anything starts."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_dcpo
from loop_runs import STEPS as RUN_STEPS
from loop_runs import assert_same_run

# The reduced tiny model of tests/test_run.py, its seed left to the study (--seed, --seeds).
FLAGS = ["--tiny-size", "test", "--batch-size", "4", "--n", "4", "--max-new-tokens", "12",
         "--eval-at", "2", "--lr", "1e-3", "--reward", "loop_reward:parity"]
STEPS = 2


def dcpo(*args, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dcpo_cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=1800)


def finish(*args, env: dict[str, str]) -> str:
    result = dcpo(*args, env=env)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result.stdout


def files_of(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- killed, resumed, reported


def run_processes(study_dir: Path) -> list[int]:
    """The `dcpo run` processes of the study still alive (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"run" in argv and any(a.startswith(str(study_dir).encode() + b"/") for a in argv):
            pids.append(int(entry.name))
    return pids


def steps_in(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in
            (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps_trained(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").read_text().count("\n")
    except OSError:
        return 0


def finished(study_dir: Path) -> set[str]:
    summaries = study_dir.glob(f"*-s*/eval/step-{STEPS:06d}/summary.json")
    return {path.parents[2].name for path in summaries}


def attempts(log: Path) -> int:
    return sum(line.startswith("# ") for line in log.read_text().splitlines())


def expected_table(study_dir: Path, algos: list[str], seeds: list[int], baseline: str) -> dict:
    """The report's figures computed here from each run's metrics.jsonl, final eval summary
    and the study's wall_seconds.json: per algorithm, mean, sample std, ratio of means."""
    wall = json.loads((study_dir / "wall_seconds.json").read_text())
    per_algo = {}
    for algo in algos:
        values: dict[str, list[float]] = {}
        for seed in seeds:
            run_dir = study_dir / f"{algo}-s{seed}"
            metrics = [json.loads(line) for line in
                       (run_dir / "metrics.jsonl").read_text().splitlines()]
            final = json.loads((run_dir / "eval" / f"step-{STEPS:06d}" / "summary.json"
                                ).read_text())["test"]
            figures = {
                "final_avg@1": final["avg@1"], "final_avg@k": final["avg@2"],
                "rur": statistics.fmean(m["nonzero_advantage_ratio"] for m in metrics),
                "tcr": statistics.fmean(m["clip_ratio"] for m in metrics),
                "sampled_per_trained": sum(m["groups_generated"] for m in metrics)
                / sum(m["groups_trained"] for m in metrics),
                "wall_seconds": wall[f"{algo}-s{seed}"]}
            for key, value in figures.items():
                values.setdefault(key, []).append(value)
        per_algo[algo] = {key: (statistics.fmean(v), statistics.stdev(v))
                          for key, v in values.items()}
    return {algo: {key: (mean, std, mean / per_algo[baseline][key][0]
                         if per_algo[baseline][key][0] else None)
                   for key, (mean, std) in figures.items()}
            for algo, figures in per_algo.items()}


@pytest.mark.slow
def test_a_killed_study_resumes_and_its_report_is_the_runs_metrics(env, tmp_path):
    """2 algorithms x 2 seeds x 2 steps, --jobs 2: SIGKILL to the study process alone once a
    run has finished and another is mid-run (its runs die with it); a re-run without the
    settings (study.json has them) skips what finished and resumes the rest; then the
    report's table against each run's metrics.jsonl and eval summary."""
    study_dir = tmp_path / "study"
    command = [sys.executable, "-m", "dcpo_cli", "study", str(study_dir), "--algo", "dcpo",
               "--algo", "grpo", "--seeds", "2", "--steps", str(STEPS), "--jobs", "2", *FLAGS]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # points of its progress, not shares of a wall time: a run finished, another has
        # trained a step and not finished
        while process.poll() is None and not (finished(study_dir) and any(
                steps_trained(p) for p in study_dir.glob("*-s*")
                if p.name not in finished(study_dir))):
            time.sleep(0.05)
        assert process.poll() is None, "the study ended before it was killed"
        os.kill(process.pid, signal.SIGKILL)  # the study process only, not its group
        process.wait()
        deadline = time.monotonic() + 300  # a bound for a busy machine, not a measurement
        while run_processes(study_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert run_processes(study_dir) == []  # the runs died with the study
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # whatever else it left (reward workers)
    names = [f"{algo}-s{seed}" for seed in (0, 1) for algo in ("dcpo", "grpo")]
    done = finished(study_dir)
    started = {n for n in names if (study_dir / "logs" / f"{n}.log").is_file()}
    assert done and started - done, "the kill was not mid-study"

    finish("study", study_dir, "--jobs", "2", env=env)  # study.json holds the settings
    for name in names:
        run_dir = study_dir / name
        assert steps_in(run_dir) == list(range(STEPS)), name  # resumed, no step twice
        assert (run_dir / "eval" / f"step-{STEPS:06d}" / "summary.json").is_file()
        log = study_dir / "logs" / f"{name}.log"
        assert attempts(log) == (2 if name in started - done else 1), (name, log.read_text())
    config = (study_dir / "dcpo-s1" / "run.toml").read_text()
    assert 'algo = "dcpo"' in config and "seed = 1" in config and "batch_size = 4" in config

    result = dcpo("report", study_dir, "--json", "--table", study_dir / "table.csv", env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["baseline"] == "grpo" and summary["missing"] == []
    expected = expected_table(study_dir, ["dcpo", "grpo"], [0, 1], "grpo")
    rows = {row["algo"]: row for row in summary["rows"]}
    assert list(rows) == ["dcpo", "grpo"]
    for algo, figures in expected.items():
        assert rows[algo]["seeds"] == [0, 1] and rows[algo]["steps"] == [STEPS, STEPS]
        assert rows[algo]["k"] == [2] and rows[algo]["eval_steps"] == [STEPS]
        for key, (mean, std, ratio) in figures.items():
            got = rows[algo]["figures"][key]
            assert got["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-12), (algo, key)
            assert got["std"] == pytest.approx(std, rel=1e-12, abs=1e-12), (algo, key)
            assert got["ratio"] == (None if ratio is None else pytest.approx(ratio)), (algo,
                                                                                      key)
    with open(study_dir / "table.csv") as handle:
        table = {row["algo"]: row for row in csv.DictReader(handle)}
    for algo, figures in expected.items():
        for key, (mean, std, _) in figures.items():
            assert float(table[algo][f"{key}_mean"]) == pytest.approx(mean), (algo, key)
            assert float(table[algo][f"{key}_std"]) == pytest.approx(std), (algo, key)
    assert (study_dir / "report.png").stat().st_size > 10_000

    printed = finish("report", study_dir, env=env)  # the rich table
    # the caption wraps at the table's width, which the study's path can exceed
    assert "mean RUR" in printed and "ratio to grpo" in " ".join(printed.split())
    assert f"{expected['dcpo']['rur'][0]:.3f} ± {expected['dcpo']['rur'][1]:.3f}" in printed


# ---------------------------------------------------------------- a study's run is `dcpo run`


@pytest.fixture(scope="module")
def one_run_study(tmp_path_factory, env, run_reference) -> tuple[Path, Path]:
    """The settings of conftest's `dcpo run` reference (dcpo, seed 3, RUN_STEPS steps)
    as a study of one run; returns the study and that run."""
    study_dir = tmp_path_factory.mktemp("one-run") / "study"
    finish("study", study_dir, "--algo", "dcpo", "--seeds", "1", "--seed", "3",
           "--steps", RUN_STEPS, *FLAGS, env=env)
    return study_dir, run_reference


@pytest.mark.slow
def test_a_study_run_writes_the_files_of_the_same_dcpo_run(one_run_study):
    study_dir, run_dir = one_run_study
    assert sorted(p.name for p in study_dir.iterdir()) == [
        "dcpo-s3", "logs", "study.json", "wall_seconds.json"]
    assert_same_run(study_dir / "dcpo-s3", run_dir)
    assert (study_dir / "dcpo-s3" / "run.toml").read_bytes() == (run_dir / "run.toml"
                                                                 ).read_bytes()
    for name in ("model.safetensors", "config.json"):  # the tiny model it started from
        assert (study_dir / "dcpo-s3" / "tiny" / "model" / name).read_bytes() == (
            run_dir / "tiny" / "model" / name).read_bytes()


@pytest.mark.slow
def test_a_finished_study_rerun_starts_nothing(one_run_study, env):
    study_dir, _ = one_run_study
    before = {k: v for k, v in files_of(study_dir).items() if k != "wall_seconds.json"}
    printed = finish("study", study_dir, env=env)
    assert "already finished" in printed
    after = {k: v for k, v in files_of(study_dir).items() if k != "wall_seconds.json"}
    assert {k: v for k, v in after.items() if k != "study.json"} == {
        k: v for k, v in before.items() if k != "study.json"}


@pytest.mark.slow
def test_a_rerun_with_other_settings_is_refused(one_run_study, env):
    study_dir, _ = one_run_study
    before = files_of(study_dir)
    result = run_dcpo("study", study_dir, "--lr", "2e-3")
    assert_one_line_error(result, "study.json", "train.lr = 0.001", "0.002", "--lr")
    result = run_dcpo("study", study_dir, "--algo", "grpo")
    assert_one_line_error(result, "study.json", "dcpo", "grpo", "--algo")
    result = run_dcpo("study", study_dir, "--seeds", "2")
    assert_one_line_error(result, "study.json", "seeds are 3", "3, 4")
    assert files_of(study_dir) == before


# ---------------------------------------------------------------- bad input, nothing started


@pytest.mark.parametrize("args, fragments", [
    (["--algo", "ppo"], ["--algo 'ppo'", "unknown algorithm", "dcpo, grpo"]),
    (["--algo", "dcpo", "--algo", "dcpo"], ["--algo dcpo", "twice"]),
    (["--algo", "dcpo", "--seeds", "0"], ["--seeds must be at least 1"]),
    (["--algo", "dcpo", "--jobs", "0"], ["--jobs must be at least 1"]),
    (["--algo", "dcpo", "--set", "train.algo=grpo"], ["--set train.algo", "per run"]),
    ([], ["no study here yet", "--algo"]),
])
def test_bad_input_is_one_line_and_starts_nothing(tmp_path, args, fragments):
    study_dir = tmp_path / "study"
    result = run_dcpo("study", study_dir, *args, "--steps", "1", *FLAGS)
    assert_one_line_error(result, *fragments)
    assert not study_dir.exists()


def test_a_run_directory_with_other_settings_is_refused(tmp_path):
    """STUDY_DIR/dcpo-s0 made by `dcpo run` with another --lr, no study.json: refused."""
    from dcpo_cli.run.config import CONFIG_FILE, new_config, write_config

    study_dir = tmp_path / "study"
    config = new_config({"algo": "dcpo", "seed": 0, "lr": 2e-3, "steps": 1}, {})
    write_config(config, study_dir / "dcpo-s0" / CONFIG_FILE)
    before = files_of(study_dir)
    result = run_dcpo("study", study_dir, "--algo", "dcpo", "--seeds", "1", "--steps", "1",
                      "--lr", "1e-3")
    assert_one_line_error(result, f"dcpo-s0/{CONFIG_FILE}", "train.lr = 0.002", "0.001")
    assert files_of(study_dir) == before  # no study.json, no logs/
    # a setting the study was not given differs too: refused all the same
    config = new_config({"algo": "dcpo", "seed": 0, "lr": 1e-3, "steps": 1},
                        {("train", "weight_decay"): 0.5})
    write_config(config, study_dir / "dcpo-s0" / CONFIG_FILE)
    before = files_of(study_dir)
    result = run_dcpo("study", study_dir, "--algo", "dcpo", "--seeds", "1", "--steps", "1",
                      "--lr", "1e-3")
    assert_one_line_error(result, f"dcpo-s0/{CONFIG_FILE}", "train.weight_decay = 0.5", "0.1")
    assert files_of(study_dir) == before


def test_a_study_json_with_other_settings_is_refused(tmp_path):
    from dcpo_cli.run.study import Study, save_study

    study_dir = tmp_path / "study"
    save_study(Study(study_dir, ["dcpo", "grpo"], [0, 1], {"lr": 1e-3, "steps": 4},
                     {"score.timeout": 9.0}))
    before = files_of(study_dir)
    for args, fragments in [
            (["--lr", "1e-2"], ["train.lr = 0.001", "0.01", "--lr"]),
            (["--set", "score.timeout=5"], ["score.timeout = 9.0", "5", "--set score.timeout"]),
            (["--algo", "dcpo"], ["algorithms are dcpo, grpo", "not dcpo (--algo)"]),
            (["--seed", "1"], ["seeds are 0, 1", "not 1, 2"])]:
        assert_one_line_error(run_dcpo("study", study_dir, *args), "study.json", *fragments)
    assert files_of(study_dir) == before


def test_help_has_every_dcpo_run_option():
    run_help, study_help = run_dcpo("run", "--help").stdout, run_dcpo("study", "--help").stdout
    options = set(re.findall(r"--[a-z][a-z0-9-]+", run_help))
    per_node = {"--node-rank", "--master-addr", "--master-port"}  # one node's invocation
    assert options - set(re.findall(r"--[a-z][a-z0-9-]+", study_help)) == per_node
    for own in ("--algo", "--seeds", "--seed", "--jobs"):
        assert own in study_help


# ---------------------------------------------------------------- the command lines


def test_each_run_is_its_run_toml_and_a_bare_dcpo_run(tmp_path, monkeypatch):
    """The study writes each run's run.toml (the configuration it planned: flags, --set and
    all) and starts `dcpo run RUN_DIR` with no settings flags."""
    from dcpo_cli.run import study as study_module
    from dcpo_cli.run.config import CONFIG_FILE, read_config
    from dcpo_cli.run.study import execute, plan_study

    given = {"steps": 7, "lr": 3e-4, "batch_size": 8, "tiny_size": "test", "n": 2,
             "eval_at": 4}
    plan = plan_study(tmp_path / "s", ["dcpo", "dapo"], 2, 5, given,
                      ["train.weight_decay=0.0", "score.timeout=9"])
    started = []

    def fake_start(command, log, env):  # record the command, run nothing
        started.append(command)
        return subprocess.Popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(study_module, "_start", fake_start)
    execute(plan, ["--verbose"], poll=0.01)
    assert [r.name for r in plan.runs()] == ["dcpo-s5", "dapo-s5", "dcpo-s6", "dapo-s6"]
    for run, command in zip(plan.runs(), started, strict=True):
        assert command[-3:] == ["run", str(plan.run_dir(run)), "--verbose"]
        config = read_config(plan.run_dir(run) / CONFIG_FILE)
        assert config == plan.new_config(run), run
        assert config["train"]["algo"] == run.algo and config["rollout"]["seed"] == run.seed
        assert config["train"]["weight_decay"] == 0.0 and config["score"]["timeout"] == 9


# ---------------------------------------------------------------- the report's arithmetic


def fake_run(algo: str, seed: int, rur: list[float], clip: list[float],
             groups: list[tuple[int, int]], final: dict[str, float], wall: float) -> dict:
    metrics = [{"step": s, "nonzero_advantage_ratio": r, "clip_ratio": c, "reward_mean": r,
                "groups_generated": g, "groups_trained": t}
               for s, (r, c, (g, t)) in enumerate(zip(rur, clip, groups, strict=True))]
    evals = [{"label": "step-000000", "step": 0, "benchmark": "test", "avg@1": 1.0,
              "avg@4": 1.0},
             {"label": f"step-{len(rur):06d}", "step": len(rur), "benchmark": "test", **final}]
    return {"name": f"{algo}-s{seed}", "algo": algo, "seed": seed, "metrics": metrics,
            "evals": evals, "wall_seconds": wall}


def test_summary_by_hand():
    from dcpo_cli.report.study import study_curves, summarize

    data = {"study": "s", "algos": ["dcpo", "grpo"], "missing": [], "runs": [
        fake_run("dcpo", 0, [1.0, 0.5], [0.0, 0.02], [(4, 4), (4, 4)],
                 {"avg@1": 30.0, "avg@4": 20.0}, 10.0),
        fake_run("dcpo", 1, [0.5, 0.5], [0.01, 0.01], [(4, 4), (4, 4)],
                 {"avg@1": 50.0, "avg@4": 40.0}, 30.0),
        fake_run("grpo", 0, [0.5, 0.5], [0.1, 0.1], [(8, 4), (4, 4)],
                 {"avg@1": 20.0, "avg@4": 10.0}, 20.0),
        fake_run("grpo", 1, [0.25, 0.25], [0.1, 0.3], [(4, 4), (12, 4)],
                 {"avg@1": 20.0, "avg@4": 30.0}, 20.0)]}
    summary = summarize(data, "grpo")
    rows = {row["algo"]: row["figures"] for row in summary["rows"]}
    dcpo, grpo = rows["dcpo"], rows["grpo"]
    assert dcpo["rur"]["values"] == {0: 0.75, 1: 0.5}
    assert dcpo["rur"]["mean"] == 0.625
    assert dcpo["rur"]["std"] == pytest.approx(math.sqrt(2 * 0.125 ** 2))
    assert grpo["rur"]["mean"] == 0.375 and dcpo["rur"]["ratio"] == pytest.approx(5 / 3)
    assert dcpo["tcr"]["mean"] == pytest.approx(0.01)
    assert grpo["tcr"]["mean"] == pytest.approx(0.15)
    assert dcpo["tcr"]["ratio"] == pytest.approx(0.01 / 0.15)
    # sampled per trained: summed over the run's steps, then the mean over seeds
    assert grpo["sampled_per_trained"]["values"] == {0: 1.5, 1: 2.0}
    assert grpo["sampled_per_trained"]["mean"] == 1.75
    assert dcpo["sampled_per_trained"]["ratio"] == pytest.approx(1 / 1.75)
    assert dcpo["final_avg@1"]["mean"] == 40.0 and dcpo["final_avg@1"]["ratio"] == 2.0
    assert grpo["final_avg@1"]["std"] == 0.0
    assert dcpo["final_avg@k"]["mean"] == 30.0 and grpo["final_avg@k"]["ratio"] == 1.0
    assert dcpo["wall_seconds"]["mean"] == 20.0 and dcpo["wall_seconds"]["ratio"] == 1.0
    assert [row["k"] for row in summary["rows"]] == [[4], [4]]

    curves = study_curves(data)
    assert curves["nonzero_advantage_ratio"]["dcpo"] == {
        "steps": [0, 1], "mean": [0.75, 0.5], "low": [0.5, 0.5], "high": [1.0, 0.5]}
    assert curves["sampled_per_trained"]["grpo"]["mean"] == [1.5, 2.0]
    assert curves["eval avg@1"]["dcpo"] == {"steps": [0, 2], "mean": [1.0, 40.0],
                                            "low": [1.0, 30.0], "high": [1.0, 50.0]}


def test_report_baseline_must_be_an_algorithm_of_the_study():
    from dcpo_cli.errors import DcpoError
    from dcpo_cli.report.study import summarize

    data = {"study": "s", "algos": ["dcpo", "grpo"], "missing": ["grpo-s0"], "runs": [
        fake_run("dcpo", 0, [1.0], [0.0], [(4, 4)], {"avg@1": 1.0, "avg@4": 1.0}, 1.0)]}
    with pytest.raises(DcpoError, match="--baseline dapo: not an algorithm"):
        summarize(data, "dapo")
    with pytest.raises(DcpoError, match="--baseline grpo: no run of it has metrics"):
        summarize(data, "grpo")
    assert summarize(data)["baseline"] == "dcpo"  # grpo has no runs yet: the first


def test_study_options_of_report_need_a_study(tmp_path):
    from dcpo_cli.run.study import Study, save_study

    (tmp_path / "run").mkdir()
    assert_one_line_error(run_dcpo("report", tmp_path / "run", "--baseline", "grpo"),
                          "--baseline and --table are for a study directory")
    save_study(Study(tmp_path / "study", ["dcpo"], [0]))
    assert_one_line_error(run_dcpo("report", tmp_path / "study", "--compare", tmp_path / "run"),
                          "a study is reported on its own")
    assert_one_line_error(run_dcpo("report", tmp_path / "study"),
                          "no run of the study has metrics yet")
    assert sorted(p.name for p in (tmp_path / "study").iterdir()) == ["study.json"]
