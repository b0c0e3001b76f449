"""`dcpo prepare` on the real benchmark files, and its errors on bad input."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import assert_one_line_error

from dcpo_cli.files import contracts
from dcpo_cli.stages.prepare import PAPER_INSTRUCTION, clean_answer, prepare_records


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
    source = read_jsonl(benchmarks / "math500.jsonl")
    # the official layout: the instruction as the system message, the bare problem as user's
    assert rows[0]["prompt"] == [{"role": "system", "content": PAPER_INSTRUCTION},
                                 {"role": "user", "content": source[0]["problem"]}]
    assert contracts.read_metadata(out)["stage"] == "prepare"
    assert dcpo("prepare", benchmarks / "math500.jsonl", "--out", tmp_path / "u.parquet",
                "--instruction-in", "user").code == 0
    rows = pq.read_table(tmp_path / "u.parquet").to_pylist()
    assert rows[0]["prompt"] == [{"role": "user",
                                  "content": f"{source[0]['problem']}\n{PAPER_INSTRUCTION}"}]


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
    from dcpo_cli.files import contracts

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


def prompt_tokens(rows) -> dict[str, list[int]]:
    """Each problem's prompt tokens under the tiny tokenizer's chat template."""
    from dcpo_cli.engines.prompting import encode_prompts
    from dcpo_cli.tiny.model import build_tokenizer

    tokenizer = build_tokenizer()
    assert tokenizer.chat_template  # a real template: the roles reach the tokens
    encoded = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    return {r["problem"]: ids for r, (_, ids) in zip(rows, encoded, strict=True)}


def test_jsonl_and_verl_parquet_give_identical_prompt_tokens(benchmarks, tmp_path):
    """The official evaluation file (verl layout) and a JSONL of the same problems become the
    same prompt tokens under the default layout; the bundled AIME24 JSONL agrees on every
    problem whose statement is worded as in the verl file (29 of 30)."""
    from dcpo_cli.evaluate.sets import load_benchmark

    verl_records = pq.read_table(benchmarks / "verl" / "aime_2024.parquet").to_pylist()
    verl = prepare_records(verl_records, "aime_2024.parquet").rows
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps({"problem": r["extra_info"]["raw_problem"],
                                         "answer": r["reward_model"]["ground_truth"]}) + "\n"
                             for r in verl_records))
    from_jsonl = prepare_records(read_jsonl(jsonl), "same.jsonl").rows
    verl_tokens, jsonl_tokens = prompt_tokens(verl), prompt_tokens(from_jsonl)
    assert len(verl_tokens) == 30 and verl_tokens == jsonl_tokens

    bundled = prompt_tokens(load_benchmark("aime24").rows)
    shared = bundled.keys() & verl_tokens.keys()
    assert len(shared) == 29
    assert all(bundled[p] == verl_tokens[p] for p in shared)
    # the other layout differs: the instruction moves into the user message
    user = prompt_tokens(load_benchmark("aime24", instruction_in="user").rows)
    assert all(user[p] != bundled[p] for p in shared)


def test_system_prompt_and_system_instruction_conflict(tmp_path, dcpo, benchmarks):
    out = tmp_path / "p.parquet"
    result = dcpo("prepare", benchmarks / "amc23.jsonl", "--out", out, "--system", "Be brief.")
    assert_one_line_error(result, "--instruction-in user")
    result = dcpo("prepare", benchmarks / "amc23.jsonl", "--out", out, "--instruction-in",
                  "assistant")
    assert_one_line_error(result, "--instruction-in")
    assert not out.exists()
    assert dcpo("prepare", benchmarks / "amc23.jsonl", "--out", out, "--system", "Be brief.",
                "--instruction-in", "user").code == 0
    first = pq.read_table(out).to_pylist()[0]["prompt"]
    assert [m["role"] for m in first] == ["system", "user"]
    assert first[0]["content"] == "Be brief." and first[1]["content"].endswith(PAPER_INSTRUCTION)
