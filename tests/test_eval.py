"""`dcpo eval`: the acceptance run on the tiny model, scripted engines with known answers,
re-run skipping, the verl source, and the one-line errors (offline without local data)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import textwrap

import pyarrow.parquet as pq
import pytest
from conftest import BUNDLED, assert_one_line_error
from fakes import ScriptedEngine

from dcpo_cli.engines.settings import EngineSettings
from dcpo_cli.errors import DcpoError
from dcpo_cli.evaluate.sets import REGISTRY, load_benchmark
from dcpo_cli.evaluate.stage import EvalOptions, run_eval
from dcpo_cli.files import contracts


def answers_of(name, limit=None):
    return [row["answer"] for row in load_benchmark(name, limit=limit).rows]


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "scripted"}')
    return path


@pytest.fixture(autouse=True)
def _no_data_dir_env(monkeypatch):
    monkeypatch.delenv("DCPO_DATA_DIR", raising=False)


def offline_without_datasets(tmp_path, monkeypatch) -> None:
    """Subprocesses see no network and a `datasets` package that cannot be imported."""
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_DATASETS["absent"])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.slow
def test_acceptance_tiny_model_aime24_avg_at_2(dcpo, random_model_dir, tmp_path, monkeypatch):
    offline_without_datasets(tmp_path, monkeypatch)  # the bundled copy, no flags
    out = tmp_path / "E"
    args = ["eval", "--model", random_model_dir, "--benchmark", "aime24", "--avg-at", "2",
            "--out", out, "--max-new-tokens", "8", "--engine", "hf"]
    result = dcpo(*args)
    assert result.code == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["aime24"]["problems"] == 30
    assert set(summary["aime24"]) == {"problems", "avg@1", "avg@2", "pass@2", "maj@2"}
    assert summary["average"] == summary["aime24"]
    for key in ("avg@1", "avg@2", "pass@2", "maj@2"):
        assert 0.0 <= summary["aime24"][key] <= 100.0
    table = contracts.read_table(out / "aime24" / "samples.parquet", "eval_samples")
    rows = table.to_pylist()
    assert len(rows) == 90
    greedy = [r for r in rows if r["greedy"]]
    assert len(greedy) == 30 and {r["sample_index"] for r in greedy} == {-1}
    sampled = sorted((r["prompt_id"], r["sample_index"]) for r in rows if not r["greedy"])
    assert sampled == sorted((pid, i) for pid in {r["prompt_id"] for r in greedy}
                             for i in (0, 1))
    assert all(0 < r["response_tokens"] <= 8 for r in rows)
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    assert "aime24" in result.stdout and "avg@2" in result.stdout
    meta = contracts.read_metadata(out / "aime24" / "samples.parquet")
    assert meta["stage"] == "eval" and meta["options"]["avg_at"] == 2
    # the same options again: nothing is generated, the file is left as it was
    before = (out / "aime24" / "samples.parquet").stat().st_mtime_ns
    again = dcpo(*args)
    assert again.code == 0, again.stderr
    assert "reused" in again.stdout
    assert (out / "aime24" / "samples.parquet").stat().st_mtime_ns == before
    assert json.loads((out / "summary.json").read_text()) == summary


def test_scripted_right_answers_score_100_and_wrong_score_0(model_dir, tmp_path):
    gold = [(row["problem"], row["answer"]) for name in ("aime24", "amc23")
            for row in load_benchmark(name).rows]

    def right(prompt, i, j, greedy):  # find the problem in the prompt, answer it
        answer = next(answer for problem, answer in gold if problem in prompt)
        return f"So the answer is \\boxed{{{answer}}}."

    engine = ScriptedEngine(right)
    options = EvalOptions(avg_at=3, pass_at=[1, 2], max_new_tokens=16)
    results = run_eval(model_dir, ["aime24", "amc23"], tmp_path / "right", options, engine=engine)
    summary = json.loads((tmp_path / "right" / "summary.json").read_text())
    assert [s.temperature for s in engine.calls] == [0.0, 1.0, 0.0, 1.0]
    assert [s.n for s in engine.calls] == [1, 3, 1, 3]
    assert summary["aime24"]["problems"] == 30 and summary["amc23"]["problems"] == 40
    for name in ("aime24", "amc23", "average"):
        assert summary[name] == pytest.approx({
            "problems": summary[name]["problems"], "avg@1": 100.0, "avg@3": 100.0,
            "pass@1": 100.0, "pass@2": 100.0, "pass@3": 100.0, "maj@3": 100.0})
    assert results["amc23"].metrics["avg@3"] == 100.0

    def wrong_reply(prompt, i, j, greedy):  # one off the gold answer
        answer = next(answer for problem, answer in gold if problem in prompt)
        return f"I think it is \\boxed{{{int(float(answer)) + 1}}}"

    wrong = ScriptedEngine(wrong_reply)
    run_eval(model_dir, ["aime24", "amc23"], tmp_path / "wrong", options, engine=wrong)
    summary = json.loads((tmp_path / "wrong" / "summary.json").read_text())
    for name in ("aime24", "amc23", "average"):
        assert {k: v for k, v in summary[name].items() if k != "problems"} == {
            "avg@1": 0.0, "avg@3": 0.0, "pass@1": 0.0, "pass@2": 0.0, "pass@3": 0.0,
            "maj@3": 0.0}
    rows = pq.read_table(tmp_path / "wrong" / "amc23" / "samples.parquet").to_pylist()
    assert rows[0]["extracted_answer"] == "28" and rows[0]["answer"] == "27.0"


def test_scripted_mixed_answers_hand_computed(model_dir, tmp_path):
    gold = answers_of("aime24", limit=2)
    # problem 0: greedy right; samples right, wrong(7), wrong(7), none -> maj 7 (wrong)
    # problem 1: greedy wrong; samples wrong(7), right, right, wrong(8) -> maj right
    script = {
        (0, True): [gold[0]], (0, False): [gold[0], "7", "7", None],
        (1, True): ["7"], (1, False): ["7", gold[1], gold[1], "8"],
    }

    def reply(prompt, i, j, greedy):
        answer = script[(i, greedy)][j]
        return "no idea" if answer is None else f"\\boxed{{{answer}}}"

    options = EvalOptions(avg_at=4, pass_at=[2], limit=2, max_new_tokens=8)
    results = run_eval(model_dir, ["aime24"], tmp_path / "E", options,
                       engine=ScriptedEngine(reply))
    metrics = results["aime24"].metrics
    assert metrics["problems"] == 2
    assert metrics["avg@1"] == pytest.approx(50.0)
    assert metrics["avg@4"] == pytest.approx(100 * 3 / 8)
    assert metrics["pass@4"] == pytest.approx(100.0)
    # pass@2: problem 0 has c=1 -> 1 - C(3,2)/C(4,2) = 1/2; problem 1 has c=2 -> 5/6
    assert metrics["pass@2"] == pytest.approx(100 * (0.5 + 5 / 6) / 2)
    assert metrics["maj@4"] == pytest.approx(50.0)
    rows = pq.read_table(tmp_path / "E" / "aime24" / "samples.parquet").to_pylist()
    none = [r for r in rows if r["response_text"] == "no idea"]
    assert len(none) == 1 and none[0]["extracted_answer"] == "" and not none[0]["correct"]


def test_rerun_skips_same_options_and_recomputes_on_change(model_dir, tmp_path):
    engine = ScriptedEngine(lambda prompt, i, j, greedy: "\\boxed{1}")
    out = tmp_path / "E"
    options = EvalOptions(avg_at=2, limit=3, max_new_tokens=8)
    first = run_eval(model_dir, ["aime25"], out, options, engine=engine)
    assert len(engine.calls) == 2 and not first["aime25"].reused
    again = run_eval(model_dir, ["aime25"], out, EvalOptions(avg_at=2, limit=3,
                     max_new_tokens=8), engine=engine)
    assert len(engine.calls) == 2 and again["aime25"].reused
    assert again["aime25"].metrics == first["aime25"].metrics
    run_eval(model_dir, ["aime25"], out, EvalOptions(avg_at=2, limit=3, max_new_tokens=8,
             seed=1), engine=engine)
    assert len(engine.calls) == 4  # a different seed is a different evaluation
    (model_dir / "config.json").write_text('{"model_type": "scripted", "changed": 1}')
    run_eval(model_dir, ["aime25"], out, EvalOptions(avg_at=2, limit=3, max_new_tokens=8,
             seed=1), engine=engine)
    assert len(engine.calls) == 6  # so is a changed model
    run_eval(model_dir, ["aime25"], out, EvalOptions(avg_at=2, limit=3, max_new_tokens=8,
             seed=1), engine=engine, engine_settings=EngineSettings(dtype="float32"))
    assert len(engine.calls) == 8  # and another engine setting (the weights' dtype)
    options_json = json.loads((out / "options.json").read_text())
    assert options_json["seed"] == 1 and options_json["benchmarks"] == ["aime25"]
    # results written inside the model directory do not change the model's fingerprint
    inside = model_dir / "eval"
    for reused in (False, True):
        result = run_eval(model_dir, ["aime25"], inside, options, engine=engine)
        assert result["aime25"].reused is reused


def test_verl_parquet_gives_the_same_30_problems(model_dir, tmp_path, benchmarks):
    verl_dir = tmp_path / "data"
    (verl_dir / "verl").mkdir(parents=True)
    shutil.copy(benchmarks / "verl" / "aime_2024.parquet", verl_dir / "verl")
    from_jsonl = load_benchmark("aime24", benchmarks)
    from_verl = load_benchmark("aime24", verl_dir)
    assert from_verl.source.endswith("aime_2024.parquet") and len(from_verl.rows) == 30
    # the JSONL writes some AIME answers with leading zeros ("023")
    assert sorted(int(r["answer"]) for r in from_verl.rows) == sorted(
        int(r["answer"]) for r in from_jsonl.rows)
    assert from_verl.rows[0]["prompt"][0]["role"] == "system"  # verl keeps its messages

    engine = ScriptedEngine(lambda prompt, i, j, greedy: "\\boxed{0}")
    results = run_eval(model_dir, [str(benchmarks / "verl" / "aime_2024.parquet")],
                       tmp_path / "E", EvalOptions(max_new_tokens=8), engine=engine)
    assert results["aime_2024"].metrics == {"problems": 30, "avg@1": 0.0}
    rows = pq.read_table(tmp_path / "E" / "aime_2024" / "samples.parquet").to_pylist()
    assert len(rows) == 30 and all(r["greedy"] for r in rows)


def test_sampled_only_and_prompts_file_and_env_data_dir(model_dir, tmp_path, monkeypatch, dcpo,
                                                         benchmarks):
    prompts = tmp_path / "p.parquet"
    assert dcpo("prepare", benchmarks / "amc23.jsonl", "--out", prompts).code == 0
    monkeypatch.setenv("DCPO_DATA_DIR", str(benchmarks))
    engine = ScriptedEngine(lambda prompt, i, j, greedy: "\\boxed{27}")
    results = run_eval(model_dir, [str(prompts), "amc23"], tmp_path / "E",
                       EvalOptions(avg_at=2, greedy=False, limit=1, max_new_tokens=8),
                       engine=engine)
    assert [s.temperature for s in engine.calls] == [1.0, 1.0]
    for name in ("p", "amc23"):  # amc23's first answer is 27 (written "27.0")
        assert results[name].metrics == {"problems": 1, "avg@2": 100.0, "pass@2": 100.0,
                                         "maj@2": 100.0}


@pytest.mark.parametrize(("args", "fragments"), [
    (["--benchmark", "aime99"], ["aime99", "unknown benchmark"]),
    (["--benchmark", "aime24", "--avg-at", "1"], ["--no-greedy"]),
    (["--benchmark", "aime24", "--no-greedy"], ["--avg-at"]),
    (["--benchmark", "aime24", "--avg-at", "2", "--pass-at", "4"], ["--pass-at 4"]),
    (["--benchmark", "aime24", "--limit", "0"], ["--limit"]),
    (["--benchmark", "aime24", "--engine", "tgi"], ["--engine", "tgi"]),
    (["--benchmark", "gsm8k", "--data-dir", "{tmp}"], ["gsm8k.jsonl", "found"]),
    (["--benchmark", "aime24", "--data-dir", "{tmp}/missing"], ["missing", "not found"]),
    (["--benchmark", "{tmp}/nope.jsonl"], ["nope.jsonl", "no such"]),
    (["--benchmark", "aime24", "--out", "{tmp}/file"], ["file", "not a directory"]),
])
def test_bad_input_is_one_line(dcpo, tmp_path, args, fragments):
    (tmp_path / "file").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "E")]
    result = dcpo("eval", "--model", tmp_path / "m", *args)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "E").exists()


FAKE_DATASETS = {
    "absent": "raise ImportError('No module named datasets')\n",
    "offline": textwrap.dedent("""
        def load_dataset(*args, **kwargs):
            raise ConnectionError("Couldn't reach 'HuggingFaceH4/aime_2024' on the Hub "
                                  "(LocalEntryNotFoundError)\\nmore detail on a second line")
    """),
}


@pytest.mark.slow
def test_acceptance_offline_aime24_and_math500_with_no_data_flags(dcpo, random_model_dir,
                                                                  tmp_path, monkeypatch):
    offline_without_datasets(tmp_path, monkeypatch)
    result = dcpo("eval", "--model", random_model_dir, "--benchmark", "aime24", "--benchmark",
                  "math500", "--avg-at", "2", "--max-new-tokens", "4", "--engine", "hf",
                  "--out", tmp_path / "E")
    assert result.code == 0, result.stderr
    summary = json.loads((tmp_path / "E" / "summary.json").read_text())
    assert summary["aime24"]["problems"] == 30 and summary["math500"]["problems"] == 500
    assert "math500" in result.stdout


def test_bundled_benchmarks_have_their_sizes_and_sources(benchmarks):
    sizes = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "gsm8k": 1319}
    assert set(sizes) == set(REGISTRY)
    notes = (BUNDLED / "SOURCES.md").read_text()
    for name, size in sizes.items():
        data = load_benchmark(name)
        assert len(data.rows) == size and data.source.endswith(f"{name}.jsonl.gz")
        assert len({r["prompt_id"] for r in data.rows}) == size
        assert all(r["answer"].strip() and r["problem"].strip() for r in data.rows)
        # the same rows as the plain JSONL in a data directory (the override path)
        plain = load_benchmark(name, benchmarks)
        assert [r["prompt"] for r in plain.rows] == [r["prompt"] for r in data.rows]
        assert [r["answer"] for r in plain.rows] == [r["answer"] for r in data.rows]
        assert f"`{name}.jsonl.gz`" in notes and REGISTRY[name].hub in notes
    # MATH-500 keeps its reference solutions; GSM8K's answer is the number after ####
    math500 = gzip.decompress((BUNDLED / "math500.jsonl.gz").read_bytes()).decode()
    assert all("\\boxed" in json.loads(line)["solution"] for line in math500.splitlines())
    assert load_benchmark("gsm8k").rows[0]["answer"] == "18"


@pytest.mark.parametrize("case", sorted(FAKE_DATASETS))
def test_a_hub_name_without_datasets_or_network_is_one_line(dcpo, tmp_path, monkeypatch, case):
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(FAKE_DATASETS[case])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    result = dcpo("eval", "--model", tmp_path / "m", "--benchmark", "HuggingFaceH4/aime_2024",
                  "--out", tmp_path / "E")
    assert_one_line_error(result, "HuggingFaceH4/aime_2024",
                          "datasets" if case == "absent" else "could not load")
    assert not (tmp_path / "E").exists()


def test_real_datasets_offline_is_one_line(dcpo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    result = dcpo("eval", "--model", tmp_path / "m", "--benchmark", "math-ai/amc23", "--out",
                  tmp_path / "E")
    assert_one_line_error(result, "math-ai/amc23", "could not load")


def test_a_hub_name_outside_the_registry_loads_its_test_split(monkeypatch):
    import datasets

    table = {"test": datasets.Dataset.from_list([{"question": "1+1?", "answer": "2"}]),
             "train": datasets.Dataset.from_list([{"question": "x", "answer": "0"}])}
    calls = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name: calls.append(name) or datasets.DatasetDict(table))
    data = load_benchmark("someone/quiz")
    assert calls == ["someone/quiz"] and data.name == "quiz"
    assert [(r["problem"], r["answer"]) for r in data.rows] == [("1+1?", "2")]
    assert data.fingerprint == "hub:someone/quiz:test"


def test_duplicate_benchmark_names_are_refused(model_dir, tmp_path, benchmarks):
    with pytest.raises(DcpoError, match="given twice"):
        run_eval(model_dir, ["aime24", str(benchmarks / "aime24.jsonl")], tmp_path / "E",
                 EvalOptions(), engine=ScriptedEngine(None))


def test_engine_returning_too_few_responses_writes_nothing(model_dir, tmp_path):
    class Short(ScriptedEngine):
        def generate(self, prompt_token_ids, settings, on_progress=None):
            groups = super().generate(prompt_token_ids, settings, on_progress)
            return [group[:1] for group in groups]

    with pytest.raises(DcpoError, match="wrong number of responses"):
        run_eval(model_dir, ["aime24"], tmp_path / "E", EvalOptions(avg_at=2, limit=2),
                 engine=Short(lambda *_: "\\boxed{1}"))
    assert not (tmp_path / "E" / "aime24" / "samples.parquet").exists()
