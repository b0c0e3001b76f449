"""`dcpo prepare` on the real benchmark files, and its errors on bad input."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import assert_one_line_error

from dcpo_cli import contracts
from dcpo_cli.prepare import PAPER_INSTRUCTION, clean_answer, prepare_records


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_verl_aime_merges_repeats_and_matches_jsonl_answers(dcpo, benchmarks, tmp_path):
    out = tmp_path / "a.parquet"
    result = dcpo("prepare", benchmarks / "verl/aime_2024.parquet", "--out", out)
    assert result.code == 0, result.stderr
    assert "930 repeated rows merged" in result.stdout
    table = contracts.read_table(out, "prompts")
    assert table.num_rows == 30
    # AIME answers are integers; the JSONL writes some with leading zeros ("023")
    expected = sorted(int(r["answer"]) for r in read_jsonl(benchmarks / "aime24.jsonl"))
    assert sorted(int(r["answer"]) for r in table.to_pylist()) == expected
    # verl prompts keep their own chat messages (system instruction + problem)
    first = table.to_pylist()[0]
    assert first["prompt"][0]["role"] == "system"


def test_math500_jsonl(dcpo, benchmarks, tmp_path):
    out = tmp_path / "m.parquet"
    assert dcpo("prepare", benchmarks / "math500.jsonl", "--out", out).code == 0
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 500
    assert rows[0]["prompt_id"] == "test/precalculus/807.json"
    assert rows[0]["prompt"][-1]["content"].endswith(PAPER_INSTRUCTION)
    assert contracts.read_metadata(out)["stage"] == "prepare"


def test_gsm8k_answer_after_hashes(dcpo, benchmarks, tmp_path):
    out = tmp_path / "g.parquet"
    assert dcpo("prepare", benchmarks / "gsm8k.jsonl", "--out", out, "--instruction", "",
                "--system", "Be brief.").code == 0
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 1319
    source = read_jsonl(benchmarks / "gsm8k.jsonl")
    for row, record in zip(rows, source, strict=True):
        assert row["answer"] == record["answer"].split("####")[-1].strip().replace(",", "")
    assert rows[0]["answer"] == "18"
    assert rows[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": source[0]["question"]}]


def test_explicit_fields_and_duplicate_ids(tmp_path, dcpo):
    src = tmp_path / "custom.json"
    src.write_text(json.dumps({"data": [
        {"q": "1+1", "gold": 2, "key": "x"},
        {"q": "2+2", "gold": 4, "key": "x"},
        {"q": "1+1", "gold": 2, "key": "y"},
    ]}))
    out = tmp_path / "p.parquet"
    result = dcpo("prepare", src, "--out", out, "--problem-field", "q", "--answer-field", "gold",
                  "--id-field", "key")
    assert result.code == 0, result.stderr
    rows = pq.read_table(out).to_pylist()
    assert [r["answer"] for r in rows] == ["2", "4"]
    assert len({r["prompt_id"] for r in rows}) == 2


def test_clean_answer():
    assert clean_answer("so 1,000 in total\n#### 1,000") == "1000"
    assert clean_answer(27.0) == "27.0"
    assert clean_answer(" 42 ") == "42"


def test_missing_problem_field_is_reported():
    from dcpo_cli.errors import DcpoError

    with pytest.raises(DcpoError, match="record 1 has no problem field"):
        prepare_records([{"text": "hi", "answer": "1"}], "x.jsonl")


@pytest.mark.slow
def test_a_folder_holding_a_hub_dataset_is_read_with_datasets(tmp_path, dcpo, benchmarks,
                                                              monkeypatch):
    """What `hf download --repo-type dataset openai/gsm8k --local-dir D` leaves behind,
    read by the same `datasets` code that loads Hub names."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # a private, empty cache
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "gsm8k"
    (folder / "main").mkdir(parents=True)
    lines = (benchmarks / "gsm8k.jsonl").read_text().splitlines()
    (folder / "main" / "train.jsonl").write_text("\n".join(lines[:7]) + "\n")
    (folder / "main" / "test.jsonl").write_text("\n".join(lines[7:10]) + "\n")
    result = dcpo("prepare", folder, "--split", "test", "--out", tmp_path / "t.parquet")
    assert result.code == 0, result.stderr
    rows = contracts.read_table(tmp_path / "t.parquet", "prompts").to_pylist()
    want = [json.loads(line)["answer"].split("####")[-1].strip() for line in lines[7:10]]
    assert [r["answer"] for r in rows] == want
    missing = dcpo("prepare", folder, "--split", "validation", "--out", tmp_path / "v.parquet")
    assert_one_line_error(missing, "gsm8k", "could not load the Hub dataset")
    assert not (tmp_path / "v.parquet").exists()


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path, dcpo):
    src = tmp_path / "sep.jsonl"
    src.write_text(json.dumps({"problem": "a\u2028b\u0085c", "answer": "1"},
                              ensure_ascii=False) + "\n", encoding="utf-8")
    result = dcpo("prepare", src, "--out", tmp_path / "p.parquet")
    assert result.code == 0, result.stderr
    from dcpo_cli import contracts

    rows = contracts.read_table(tmp_path / "p.parquet", "prompts").to_pylist()
    assert len(rows) == 1 and "a\u2028b\u0085c" in json.dumps(rows[0]["prompt"],
                                                             ensure_ascii=False)


@pytest.mark.parametrize("case", ["truncated", "missing_column", "bad_jsonl", "empty",
                                  "verl_without_content"])
def test_bad_inputs_give_one_line_and_no_output(case, tmp_path, dcpo, benchmarks):
    out = tmp_path / "out.parquet"
    if case == "truncated":
        src = tmp_path / "cut.parquet"
        src.write_bytes((benchmarks / "verl/aime_2024.parquet").read_bytes()[:5000])
        fragments = ("cut.parquet", "not a readable Parquet file")
    elif case == "missing_column":
        src = tmp_path / "noanswer.jsonl"
        src.write_text(json.dumps({"problem": "1+1"}) + "\n")
        fragments = ("noanswer.jsonl", "no answer field")
    elif case == "bad_jsonl":
        src = tmp_path / "bad.jsonl"
        src.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": oops}\n')
        fragments = ("bad.jsonl", "line 2: not valid JSON")
    elif case == "verl_without_content":
        src = tmp_path / "verl.jsonl"
        src.write_text(json.dumps({"prompt": [{"role": "user"}],
                                   "reward_model": {"ground_truth": "3"}}) + "\n")
        fragments = ("verl.jsonl", "record 1 is not in the verl layout")
    else:
        src = tmp_path / "empty.jsonl"
        src.write_text("")
        fragments = ("empty.jsonl", "empty")
    result = dcpo("prepare", src, "--out", out)
    assert_one_line_error(result, *fragments)
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
