"""`--report-to`: the metrics and eval summaries in TensorBoard and W&B (for real, offline),
one tracker run across the shell loop's processes, no step logged twice, and a tracker that
fails costing a warning, never the step."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import write_scored
from conftest import assert_one_line_error, run_dcpo

from dcpo_cli.cli import run
from dcpo_cli.trackers import session as tr
from dcpo_cli.trackers.base import Backend, tracker_values
from dcpo_cli.trackers.session import TRACKERS_FILE, Trackers
from dcpo_cli.trackers.tensorboard import TensorBoard
from dcpo_cli.trackers.wandb import Wandb

REWARDS_0 = {"p0": [1, 0, 0, 1], "p1": [0, 0, 0, 1], "p2": [1, 1, 0, 1], "p3": [0, 1, 0, 0]}
REWARDS_1 = {"p0": [1, 1, 1, 1], "p1": [0, 0, 0, 0], "p2": [1, 0, 1, 1], "p3": [0, 1, 1, 0]}
FAST = ["--lr", "1e-3", "--warmup-steps", "0", "--micro-batch-tokens", "256"]


class Recorder(Backend):
    """A backend that keeps what it is sent (class-level, across 'processes')."""

    name = "recorder"
    sent: list[tuple[dict, int]] = []
    starts: list[dict] = []

    def start(self, home, run_name, kept, config):
        Recorder.starts.append(dict(kept))
        return {"run_id": kept.get("run_id", "r1")}

    def log(self, values, step):
        Recorder.sent.append((values, step))

    def finish(self):
        pass


@pytest.fixture
def recorder(monkeypatch):
    Recorder.sent, Recorder.starts = [], []
    monkeypatch.setitem(tr.BACKENDS, "recorder", Recorder)
    return Recorder


def test_values_are_the_records_numbers():
    record = {"loss": 0.5, "updates": 4, "algo": "dcpo", "entropy": None, "flag": True,
              "peak_gib_per_rank": [1.5, 2.0], "checkpoint": "/x"}
    assert tracker_values("train", record) == {
        "train/loss": 0.5, "train/updates": 4, "train/flag": 1,
        "train/peak_gib_per_rank/0": 1.5, "train/peak_gib_per_rank/1": 2.0}


def test_report_to_names():
    from dcpo_cli.errors import DcpoError
    from dcpo_cli.options import report_to

    assert report_to(["wandb,tensorboard", "wandb", "none"]) == ["wandb", "tensorboard"]
    assert report_to(["none"]) == [] and report_to(None) == []
    with pytest.raises(DcpoError, match="--report-to 'comet'"):
        report_to(["comet"])


def test_a_train_step_is_logged_once_across_processes_and_evals_once_per_step(recorder,
                                                                              tmp_path):
    first = Trackers(["recorder"], tmp_path, "run", {"train": {"lr": 1}})
    first.log("train", {"train/loss": 1.0}, 1)
    first.log("train", {"train/loss": 1.0}, 1)  # the same step again: a resume
    first.close()
    second = Trackers(["recorder"], tmp_path, "run", {"train": {"lr": 1}})  # a new process
    second.log("train", {"train/loss": 9.0}, 1)  # re-run of step 1: already logged
    second.log("train", {"train/loss": 2.0}, 2)
    second.log_eval({"aime24": {"avg@8": 10.0}, "_model": {"x": 1}}, 2)
    second.log_eval({"aime24": {"avg@8": 10.0}}, 2)  # eval re-run: not again
    second.log_eval({"aime24": {"avg@8": 5.0}}, 0)  # an earlier checkpoint: its own step
    second.log_eval({"math500": {"avg@8": 7.0}}, 2)  # another benchmark, same step
    second.close()
    assert recorder.sent == [({"train/loss": 1.0}, 1), ({"train/loss": 2.0}, 2),
                             ({"eval/aime24/avg@8": 10.0}, 2), ({"eval/aime24/avg@8": 5.0}, 0),
                             ({"eval/math500/avg@8": 7.0}, 2)]
    kept = json.loads((tmp_path / TRACKERS_FILE).read_text())["recorder"]
    assert kept["run_id"] == "r1"
    assert kept["logged"] == {"train": 2, "eval/aime24": [0, 2], "eval/math500": [2]}
    assert recorder.starts == [{}, {"run_id": "r1"}]  # the second process continued the run
    third = Trackers(["recorder"], tmp_path, "run", {})
    third.log("train", {"train/loss": 2.0}, 2)
    assert len(recorder.starts) == 2  # nothing new to log: no tracker run opened


def test_a_failing_tracker_warns_once_and_the_others_go_on(recorder, tmp_path, capsys,
                                                           monkeypatch):
    def broken(self, values, step):
        raise ConnectionError("network is down")

    monkeypatch.setattr(TensorBoard, "log", broken)
    trackers = Trackers(["tensorboard", "recorder"], tmp_path, "run", {})
    trackers.log("train", {"train/loss": 1.0}, 1)
    trackers.log("train", {"train/loss": 2.0}, 2)
    trackers.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["warning: --report-to tensorboard: ConnectionError: network is down; "
                     "not logging to tensorboard (the files are the record)"]
    assert [step for _, step in recorder.sent] == [1, 2]
    kept = json.loads((tmp_path / TRACKERS_FILE).read_text())
    assert "logged" not in kept["tensorboard"]  # never counted as logged


def test_a_missing_package_is_a_warning(recorder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    trackers = Trackers(["wandb", "recorder"], tmp_path, "run", {})
    trackers.log("train", {"train/loss": 1.0}, 1)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1
    assert "wandb is not installed (pip install 'dcpo-cli[wandb]')" in err
    assert recorder.sent == [({"train/loss": 1.0}, 1)]


def test_bad_report_to_is_one_line(tmp_path):
    result = run_dcpo("train-step", "--model", tmp_path, "--scored", tmp_path / "s.parquet",
                      "--state", tmp_path / "state.json", "--out", tmp_path / "ckpt",
                      "--report-to", "comet")
    assert_one_line_error(result, "--report-to 'comet'", "tensorboard")
    assert list(tmp_path.iterdir()) == []


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in `logdir`, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    accumulator = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    accumulator.Reload()
    return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item())
                  for e in accumulator.Tensors(tag)]
            for tag in accumulator.Tags()["tensors"] if not tag.startswith("config/")}


def wandb_records(wandb_dir: Path) -> list[list[dict]]:
    """The records of each offline run under `wandb_dir`, read with wandb's own reader of
    its .wandb transaction log (`wandb leet inspect --json`), in run start order."""
    cli = Path(sys.executable).parent / "wandb"
    runs = []
    for run_dir in sorted(wandb_dir.glob("offline-run-*")):
        text = subprocess.run([str(cli), "leet", "inspect", "--json", str(run_dir)],
                              capture_output=True, text=True, check=True).stdout
        runs.append([json.loads(line) for line in text.splitlines() if line.startswith("{")])
    return runs


def numeric(record: dict) -> dict[str, float]:
    return tracker_values("train", record)


@pytest.mark.slow
def test_two_train_step_processes_continue_one_run_in_tensorboard_and_wandb(
        random_model_dir, tokenizer, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = run_dir / "metrics.jsonl"

    def step(index: int, model: Path, rewards: dict) -> Path:
        scored = write_scored(tmp_path / f"scored-{index}.parquet", tokenizer, index, rewards)
        out = run_dir / "ckpt" / f"step-{index + 1:06d}"
        result = run_dcpo("train-step", "--model", model, "--scored", scored, "--state",
                          run_dir / "state.json", "--out", out, "--metrics-log", log,
                          "--report-to", "tensorboard", "--report-to", "wandb", *FAST)
        assert result.code == 0, result.stderr
        assert "warning" not in result.stderr, result.stderr
        return out

    first = step(0, random_model_dir, REWARDS_0)
    second = step(1, first, REWARDS_1)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["global_step"] for r in records] == [1, 2]

    scalars = tensorboard_scalars(run_dir / "tensorboard")
    expected = {}
    for record in records:
        for key, value in numeric(record).items():
            expected.setdefault(key, []).append((record["global_step"], value))
    assert scalars == expected  # every number, at its step, exactly (float64 scalars)
    assert {"train/loss", "train/reward_mean", "train/clip_ratio", "train/lr"} <= set(scalars)

    runs = wandb_records(run_dir / "wandb")
    assert len(runs) == 2  # one offline directory per process, of the same run
    ids = {r["run"]["run_id"] for records_ in runs for r in records_ if r["type"] == "run"}
    kept = json.loads((run_dir / TRACKERS_FILE).read_text())
    assert ids == {kept["wandb"]["run_id"]}
    assert kept["wandb"]["logged"] == {"train": 2} == kept["tensorboard"]["logged"]
    rows = [r["history"]["item"] for records_ in runs for r in records_
            if r["type"] == "history"]
    assert [row["global_step"] for row in rows] == [1, 2]
    for row, record in zip(rows, records, strict=True):
        assert {k: row[k] for k in numeric(record)} == numeric(record)
    config = next(r["run"]["config"]["update"] for r in runs[0] if r["type"] == "run")
    assert config["train"]["lr"] == 1e-3 and config["train"]["algo"] == "dcpo"

    # a re-run of the second step (a resumed loop): done, and nothing logged again
    events = sorted((run_dir / "tensorboard").iterdir())
    again = run_dcpo("train-step", "--model", first, "--scored", tmp_path / "scored-1.parquet",
                     "--state", run_dir / "state.json", "--out", second, "--metrics-log", log,
                     "--report-to", "tensorboard", "--report-to", "wandb", *FAST)
    assert again.code == 0, again.stderr
    assert "already done" in again.stderr
    assert sorted((run_dir / "tensorboard").iterdir()) == events
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    assert tensorboard_scalars(run_dir / "tensorboard") == expected


@pytest.mark.slow
def test_a_step_killed_before_its_tracker_logs_it_on_the_rerun(random_model_dir, tokenizer,
                                                               tmp_path, recorder,
                                                               monkeypatch):
    """A step whose files are written but whose tracker never heard of it (killed in
    between) is logged by the re-run, once."""
    from dcpo_cli.options import TrainOptions
    from dcpo_cli.train.step import run_train_step

    scored = write_scored(tmp_path / "scored-0.parquet", tokenizer, 0, REWARDS_0)
    options = TrainOptions(lr=1e-3, warmup_steps=0, micro_batch_tokens=256,
                           metrics_log=tmp_path / "metrics.jsonl")
    state, out = tmp_path / "state.json", tmp_path / "ckpt-1"
    run_train_step(random_model_dir, [scored], state, out, options, show_progress=False)
    assert recorder.sent == []  # no trackers: as if killed before logging
    for _ in range(2):
        trackers = Trackers(["recorder"], tmp_path, "run", {})
        outcome = run_train_step(random_model_dir, [scored], state, out, options,
                                 show_progress=False, trackers=trackers)
        trackers.close()
        assert outcome.status == "done"
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert recorder.sent == [(numeric(record), 1)]


def test_a_tracker_that_raises_never_fails_the_step(random_model_dir, tokenizer, tmp_path,
                                                    monkeypatch, capsys):
    """Through the command, in-process: tensorboard raising while logging and wandb failing
    to start give one warning line each; exit 0, the checkpoint and metrics written. (A
    tracker not installed at all is refused before the step: tests/test_extras.py.)"""
    def broken(self, values, step):
        raise RuntimeError("disk quota exceeded")

    def offline(self, *args):
        raise ConnectionError("wandb.ai unreachable")

    monkeypatch.setattr(TensorBoard, "log", broken)
    monkeypatch.setattr(Wandb, "start", offline)
    scored = write_scored(tmp_path / "scored-0.parquet", tokenizer, 0, REWARDS_0)
    code = run(["train-step", "--model", str(random_model_dir), "--scored", str(scored),
                "--state", str(tmp_path / "state.json"), "--out", str(tmp_path / "ckpt-1"),
                "--metrics-log", str(tmp_path / "metrics.jsonl"), "--report-to",
                "tensorboard,wandb", *FAST])
    assert code == 0
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning:")]
    assert len(warnings) == 2, warnings
    assert "disk quota exceeded" in warnings[0] or "disk quota exceeded" in warnings[1]
    assert (tmp_path / "ckpt-1" / "metrics.json").is_file()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_dcpo_run_logs_every_metric_and_evaluation_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    code = run(["run", str(run_dir), "--steps", "2", "--tiny-size", "test", "--batch-size",
                "4", "--n", "4", "--max-new-tokens", "8", "--eval-at", "2",
                "--report-to", "tensorboard"])
    assert code == 0
    assert 'report_to = ["tensorboard"]' in (run_dir / "run.toml").read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    for record in records:
        for key, value in numeric(record).items():
            assert (record["global_step"], value) in scalars[key], key
    for label, step in (("step-000000", 0), ("step-000002", 2)):
        summary = json.loads((run_dir / "eval" / label / "summary.json").read_text())
        for benchmark, metrics in summary.items():
            if benchmark.startswith("_"):
                continue
            for key, value in metrics.items():
                assert scalars[f"eval/{benchmark}/{key}"].count((step, value)) == 1
    # a re-run (all done) logs nothing again; one with --report-to none turns it off
    assert run(["run", str(run_dir)]) == 0
    assert tensorboard_scalars(run_dir / "tensorboard") == scalars
    assert run(["run", str(run_dir), "--report-to", "none"]) == 0
    assert 'report_to = ["none"]' in (run_dir / "run.toml").read_text()


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                    reason="mlflow is an optional extra (pip install 'dcpo-cli[mlflow]')")
def test_mlflow_continues_one_run(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow-skinny has no sqlite store
    for step in (1, 2):
        trackers = Trackers(["mlflow"], tmp_path, "run", {"train": {"lr": 0.1}})
        trackers.log("train", {"train/loss": step / 10}, step)
        trackers.log_eval({"aime24": {"avg@8": 12.5}}, step)
        trackers.close()
    run_id = json.loads((tmp_path / TRACKERS_FILE).read_text())["mlflow"]["run_id"]
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2)]
    assert [m.step for m in client.get_metric_history(run_id, "eval/aime24/avg_at_8")] == [1, 2]
    assert client.get_run(run_id).data.params["train.lr"] == "0.1"


def test_eval_logs_its_summary_at_the_checkpoints_step_in_the_runs_tracker(recorder,
                                                                           tmp_path):
    from fakes import ScriptedEngine

    from dcpo_cli.evaluate.stage import EvalOptions, run_eval
    from dcpo_cli.files.checkpoint import TRAINER_FORMAT, TRAINER_STATE
    from dcpo_cli.trackers.session import tracker_home_for_eval

    run_dir = tmp_path / "run"
    checkpoint = run_dir / "ckpt" / "step-000007"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text('{"model_type": "scripted"}')
    (checkpoint / TRAINER_STATE).write_text(json.dumps({"format": TRAINER_FORMAT,
                                                        "global_step": 7}))
    (run_dir / TRACKERS_FILE).write_text(json.dumps({"recorder": {"run_id": "abc"}}))
    out = run_dir / "eval" / "step-000007"
    home = tracker_home_for_eval(out)
    assert home == run_dir.resolve()  # the run's tracker run, found from --out
    assert tracker_home_for_eval(tmp_path / "elsewhere") == (tmp_path / "elsewhere").resolve()
    engine = ScriptedEngine(lambda prompt, i, j, greedy: "\\boxed{0}")
    options = EvalOptions(avg_at=2, limit=3, max_new_tokens=8)
    for _ in range(2):  # the re-run reuses the samples and logs nothing again
        trackers = Trackers(["recorder"], home, "run", {"eval": {}})
        run_eval(checkpoint, ["aime24"], out, options, engine=engine, trackers=trackers)
        trackers.close()
    summary = json.loads((out / "summary.json").read_text())
    assert recorder.starts == [{"run_id": "abc"}]
    assert recorder.sent == [({f"eval/aime24/{k}": v for k, v in summary["aime24"].items()}, 7),
                             ({f"eval/average/{k}": v for k, v in summary["average"].items()},
                              7)]


def test_dcpo_eval_command_reports_to_tensorboard(random_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "eval"
    code = run(["eval", "--model", str(random_model_dir), "--benchmark", "aime24", "--limit",
                "2", "--max-new-tokens", "4", "--engine", "hf", "--out", str(out),
                "--report-to", "tensorboard"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    scalars = tensorboard_scalars(out / "tensorboard")  # no run around it: --out keeps it
    assert scalars == {f"eval/{b}/{k}": [(0, v)] for b in ("aime24", "average")
                       for k, v in summary[b].items()}
    assert json.loads((out / TRACKERS_FILE).read_text())["tensorboard"]["logged"] == {
        "eval/aime24": [0], "eval/average": [0]}


TRACKIO_CHECK = """
import json, sys
from pathlib import Path
from dcpo_cli.trackers.session import Trackers
home = Path(sys.argv[1])
for step in (1, 2):  # two processes' worth: the second resumes the run by name
    trackers = Trackers(["trackio"], home, "run", {"train": {"lr": 0.1}})
    trackers.log("train", {"train/loss": step / 10}, step)
    trackers.log("train", {"train/loss": 9.0}, step)  # again: not logged
    trackers.log_eval({"aime24": {"avg@8": 12.5}}, step)
    trackers.close()
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps([SQLiteStorage.get_runs("dcpo"), SQLiteStorage.get_logs("dcpo", "run")]))
"""


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None,
                    reason="trackio is an optional extra (pip install 'dcpo-cli[trackio]')")
def test_trackio_continues_one_run(tmp_path):
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}  # read at its import
    result = subprocess.run([sys.executable, "-c", TRACKIO_CHECK, str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # trackio's banners kept off stdout
    runs, logs = json.loads(lines[0])
    assert runs == ["run"]
    assert [(row["step"], {k: v for k, v in row.items() if "/" in k}) for row in logs] == [
        (1, {"train/loss": 0.1}), (1, {"eval/aime24/avg@8": 12.5}),
        (2, {"train/loss": 0.2}), (2, {"eval/aime24/avg@8": 12.5})]


def test_wandb_not_logged_in_is_one_warning(tmp_path, monkeypatch, capsys, recorder):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_MODE", "online")
    trackers = Trackers(["wandb", "recorder"], tmp_path / "run", "run", {})
    trackers.log("train", {"train/loss": 1.0}, 1)
    trackers.log("train", {"train/loss": 2.0}, 2)  # given up after the first failure
    trackers.close()
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: --report-to wandb: "), err
    assert [step for _, step in recorder.sent] == [1, 2]
    assert "logged" not in json.loads((tmp_path / "run" / TRACKERS_FILE).read_text())["wandb"]
