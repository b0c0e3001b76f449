"""`dcpo report`: gathering metrics and eval summaries, the tables, the figure, the errors."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from hypothesis import given, settings
from hypothesis import strategies as st

from dcpo_cli.errors import DcpoError
from dcpo_cli.report.runs import (
    eval_series,
    gather,
    gather_run,
    load_metrics,
    plot_runs,
    read_metrics_log,
    series,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics_record(step: int, algo: str = "dcpo", skew: float = 0.0) -> dict:
    """A plausible train-step metrics record (smooth curves so the figure can be looked at)."""
    return {
        "step": step, "global_step": 4 * (step + 1), "algo": algo,
        "reward_mean": 0.2 + 0.5 * (1 - math.exp(-step / 8)) - skew,
        "clip_ratio": 0.02 + 0.01 * math.sin(step) + skew / 10,
        "clip_ratio_low": 0.008 + skew / 20, "clip_ratio_high": 0.012 + 0.01 * math.sin(step),
        "nonzero_advantage_ratio": 0.72 - skew, "response_length_mean": 40 + step,
        "truncated_ratio": max(0.0, 0.3 - step / 50), "approx_kl": 1e-4 * (1 + step % 3),
        "entropy": 1.5 - step / 40, "grad_norm": 0.5, "lr": 1e-6, "tokens_per_second": 900.0,
        "seconds": 12.5, "kl_ref": 1e-3 * step, "mismatch_kl": 2e-3 + skew / 100,
        "mismatch_logprob_diff": 0.02, "mismatch_outside_ratio": 1e-3 * (step % 2),
    }


def write_run(root: Path, name: str, steps: range, algo: str = "dcpo", skew: float = 0.0,
              layout: str = "jsonl", evals: dict[int, float] | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    records = [metrics_record(s, algo, skew) for s in steps]
    if layout == "jsonl":
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        for record in records:
            ckpt = run / "ckpt" / f"step-{record['step'] + 1:06d}"
            ckpt.mkdir(parents=True)
            (ckpt / "metrics.json").write_text(json.dumps(record))
    for step, accuracy in (evals or {}).items():
        folder = run / "eval" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        summary = {"aime24": {"problems": 30, "avg@1": accuracy, "avg@32": accuracy - 3,
                              "pass@32": accuracy + 20, "maj@32": accuracy},
                   "gsm8k": {"problems": 50, "avg@1": accuracy + 10},
                   "_meta": {"model": "x"}}
        (folder / "summary.json").write_text(json.dumps(summary))
    return run


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --- gathering (pure) -------------------------------------------------------------------------


def test_gather_reads_jsonl_sorted_and_keeps_the_last_record_of_a_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [metrics_record(2), metrics_record(0), {**metrics_record(1), "reward_mean": 0.1},
             {**metrics_record(1), "reward_mean": 0.9}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    data = gather_run(run)
    assert [r["step"] for r in data["metrics"]] == [0, 1, 2]
    assert series(data, "reward_mean")[1][1] == 0.9  # the rerun of step 1 wins
    assert data["algo"] == "dcpo" and data["metrics_source"].endswith("metrics.jsonl")


def test_gather_falls_back_to_checkpoint_metrics(tmp_path):
    run = write_run(tmp_path, "ckpts", range(3), algo="grpo", layout="ckpt")
    records, source = load_metrics(run)
    assert [r["step"] for r in records] == [0, 1, 2] and source == run / "ckpt"
    assert gather_run(run)["algo"] == "grpo"


def test_missing_keys_and_bad_values_are_skipped(tmp_path):
    run = tmp_path / "sparse"
    run.mkdir()
    lines = [{"global_step": 5, "reward_mean": 0.5}, {"step": 7, "reward_mean": None},
             {"step": 8, "reward_mean": "n/a", "approx_kl": float("nan")}, {}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    data = gather_run(run)
    # no step: global_step, then the line's position among the records.
    assert [r["step"] for r in data["metrics"]] == [3, 5, 7, 8]
    assert series(data, "reward_mean") == ([5], [0.5])
    assert series(data, "approx_kl") == ([], []) and data["algo"] is None
    assert series(data, "kl_ref") == ([], [])
    # panels without data say so instead of failing
    figure = plot_runs(gather([run, write_run(tmp_path, "full", range(3))]), tmp_path / "s.png")
    assert png_size(figure) == (1800, 1400)


def test_eval_summaries(tmp_path):
    run = write_run(tmp_path, "run", range(3), evals={0: 10.0, 20: 40.0})
    other = run / "eval" / "final"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps({"aime24": {"avg@1": 50.0}, "_step": 30,
                                                    "average": {"avg@1": 50.0}}))
    two = json.loads((run / "eval" / "step-000020" / "summary.json").read_text())
    two["average"] = {"avg@1": 45.0}
    (run / "eval" / "step-000020" / "summary.json").write_text(json.dumps(two))
    data = gather_run(run)
    # The average is kept over two benchmarks and dropped over one (it would repeat it).
    assert {(r["label"], r["benchmark"]) for r in data["evals"]} == {
        ("step-000000", "aime24"), ("step-000000", "gsm8k"), ("step-000020", "aime24"),
        ("step-000020", "gsm8k"), ("step-000020", "average"), ("final", "aime24")}
    curves = eval_series(data)
    assert curves[("aime24", "avg@1")] == ([0, 20, 30], [10.0, 40.0, 50.0])
    assert curves[("aime24", "avg@32")] == ([0, 20], [7.0, 37.0])
    assert ("aime24", "pass@32") not in curves and ("_meta", "avg@1") not in curves


def test_compare_labels_are_distinct(tmp_path):
    runs = gather([write_run(tmp_path / "a", "run", range(2)),
                   write_run(tmp_path / "b", "run", range(2), algo="grpo"),
                   write_run(tmp_path, "other", range(2), algo="gspo")])
    labels = [run["label"] for run in runs]
    assert len(set(labels)) == 3 and labels[2] == "other (gspo)"
    assert "grpo" in labels[1] and str(tmp_path / "b") in labels[1]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.floats(-1, 1)), min_size=1, max_size=20))
def test_series_is_sorted_and_last_write_wins(tmp_path_factory, pairs):
    run = tmp_path_factory.mktemp("prop")
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "reward_mean": v}) + "\n" for s, v in pairs))
    expected = dict(pairs)  # later pairs overwrite earlier ones, as a rerun step does
    steps, values = series(gather_run(run), "reward_mean")
    assert steps == sorted(expected) and values == [expected[s] for s in steps]


def test_malformed_line_names_file_and_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps(metrics_record(0)) + "\n\n{\"step\": 1, oops\n")
    with pytest.raises(DcpoError, match=r"metrics.jsonl line 3: not valid JSON"):
        read_metrics_log(log)
    log.write_text("[1, 2]\n")
    with pytest.raises(DcpoError, match="line 1: expected a JSON object"):
        read_metrics_log(log)


# --- the command ------------------------------------------------------------------------------


def test_report_writes_png_and_tables(dcpo, tmp_path):
    run = write_run(tmp_path, "dcpo-run", range(12), evals={0: 10.0, 6: 30.0, 11: 45.0})
    result = dcpo("report", run)
    assert result.code == 0, result.stderr
    width, height = png_size(run / "report.png")
    assert width >= 1200 and height >= 700 and (run / "report.png").stat().st_size > 30_000
    stdout = result.stdout
    assert "dcpo-run (dcpo): 12 steps" in stdout and "TCR" in stdout and "RUR" in stdout
    assert "KL ref" in stdout and "mismatch KL" in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("│")]
    for step in range(12):  # every step has a row, with its global step beside it
        assert any(line.split("│")[1].strip() == str(step)
                   and line.split("│")[2].strip() == str(4 * (step + 1)) for line in rows), step
    assert "evaluations" in stdout and "aime24" in stdout and "45.0" in stdout
    assert f"wrote {run / 'report.png'}" in stdout.replace("\n", "")
    assert not list(run.glob(".report.png.*"))  # no temporary left behind


@pytest.mark.slow
def test_report_compare_and_json(dcpo, tmp_path):
    a = write_run(tmp_path, "dcpo-run", range(10), evals={9: 40.0})
    b = write_run(tmp_path, "grpo-run", range(8), algo="grpo", skew=0.2, layout="ckpt")
    c = write_run(tmp_path, "gspo-run", range(5), algo="gspo", skew=0.1)
    figure = tmp_path / "figs" / "compare.png"
    result = dcpo("report", a, "--compare", b, c, "--out", figure, "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["figure"] == str(figure) and png_size(figure)[0] >= 1200
    assert [r["label"] for r in data["runs"]] == ["dcpo-run (dcpo)", "grpo-run (grpo)",
                                                  "gspo-run (gspo)"]
    assert [len(r["metrics"]) for r in data["runs"]] == [10, 8, 5]
    assert data["runs"][0]["evals"][0]["avg@1"] == 40.0
    assert not (a / "report.png").exists()
    tables = dcpo("report", a, "--compare", b, "--out", tmp_path / "two.svg")
    assert tables.code == 0 and "grpo-run (grpo): 8 steps" in tables.stdout
    assert (tmp_path / "two.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.slow
def test_report_errors(dcpo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(dcpo("report", empty), str(empty), "no metrics found")
    assert_one_line_error(dcpo("report", tmp_path / "nope"), "no such run directory")
    run = write_run(tmp_path, "run", range(2))
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write("not json\n")
    assert_one_line_error(dcpo("report", run), "metrics.jsonl line 3", "not valid JSON")
    assert not (run / "report.png").exists()
    good = write_run(tmp_path, "good", range(2))
    assert_one_line_error(dcpo("report", good, "--compare", empty), "no metrics found")
    assert_one_line_error(dcpo("report", good, "--out", tmp_path / "r.docx"), "r.docx",
                          "cannot write")
    bad_eval = good / "eval" / "step-000001"
    bad_eval.mkdir(parents=True)
    (bad_eval / "summary.json").write_text("{")
    assert_one_line_error(dcpo("report", good), "summary.json", "not valid JSON")
