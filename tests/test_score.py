"""dcpo score: shards in, one scored file out; foreign files; overlong shaping; user rewards."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from builders import write_rollouts
from conftest import assert_one_line_error

from dcpo_cli.cli import run
from dcpo_cli.files import contracts


@pytest.mark.slow
def test_math500_reference_solutions_score_500_of_500_via_the_cli(benchmarks, tmp_path, dcpo):
    rows = [json.loads(line) for line in (benchmarks / "math500.jsonl").read_text().splitlines()]
    table = pa.table({"prompt_id": [r["unique_id"] for r in rows],
                      "response_text": [r["solution"] for r in rows],
                      "answer": [r["answer"] for r in rows]})
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "foreign.parquet")  # no dcpo metadata: another tool's
    result = dcpo("score", tmp_path / "foreign.parquet", "--out", tmp_path / "s.parquet")
    assert result.code == 0, result.stderr
    assert "100.0%" in result.stdout and "500" in result.stdout
    scored = contracts.read_parquet(tmp_path / "s.parquet")
    assert scored.column("correct").to_pylist() == [True] * 500
    assert scored.column("reward").to_pylist() == [1.0] * 500
    assert scored.column("extracted_answer").to_pylist()[0] == \
        "\\left( 3, \\frac{\\pi}{2} \\right)"
    meta = contracts.read_metadata(tmp_path / "s.parquet")
    assert meta["kind"] == "scored-responses"  # scored, but not trainable (no token ids)
    assert meta["accuracy"] == 1.0


def test_shards_become_one_scored_file(tmp_path):
    a = write_rollouts(tmp_path / "a.parquet", ["\\boxed{4}", "4", "\\boxed{5}", "\\boxed{4.0}"],
                  ["4", "4", "4", "4"])
    b = write_rollouts(tmp_path / "b.parquet", ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}"],
                  ["1/2", "\\frac12"], start=4)
    assert run(["score", str(a), str(b), "--out", str(tmp_path / "s.parquet"),
                "--wrong-reward", "-1", "--workers", "2"]) == 0
    scored = contracts.read_table(tmp_path / "s.parquet", "scored")  # the contract train-step reads
    assert scored.num_rows == 6
    assert scored.column("correct").to_pylist() == [True, False, False, True, True, True]
    assert scored.column("reward").to_pylist() == [1.0, -1.0, -1.0, 1.0, 1.0, 1.0]
    assert scored.column("extracted_answer").to_pylist() == [
        "4", "", "5", "4.0", "\\frac{1}{2}", "0.5"]
    assert scored.column("verify_timeout").to_pylist() == [False] * 6
    assert "overlong_penalty" not in scored.column_names
    meta = contracts.read_metadata(tmp_path / "s.parquet")
    assert meta["kind"] == "scored" and meta["step"] == 3 and meta["max_new_tokens"] == 16
    assert set(meta["inputs"]) == {str(a), str(b)}


def test_overlong_shaping_uses_the_rollouts_max_length(tmp_path):
    lengths = [10, 12, 13, 14, 16]  # L_max 16 from the metadata, buffer 4: free up to 12
    path = write_rollouts(tmp_path / "r.parquet", ["\\boxed{1}", "\\boxed{2}"] * 2 + ["\\boxed{1}"],
                     ["1"] * 5, lengths=lengths)
    assert run(["score", str(path), "--out", str(tmp_path / "s.parquet"),
                "--overlong-buffer", "4"]) == 0
    scored = contracts.read_table(tmp_path / "s.parquet", "scored")
    assert scored.column("overlong_penalty").to_pylist() == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert scored.column("reward").to_pylist() == [1.0, 0.0, 0.75, -0.5, 0.0]
    # --max-length overrides the metadata (and serves files without it)
    assert run(["score", str(path), "--out", str(tmp_path / "t.parquet"),
                "--overlong-buffer", "4", "--max-length", "14"]) == 0
    scored = contracts.read_table(tmp_path / "t.parquet", "scored")
    assert scored.column("overlong_penalty").to_pylist() == [0.0, -0.5, -0.75, -1.0, -1.0]


@pytest.mark.slow
def test_user_reward_function(tmp_path, dcpo):
    (tmp_path / "my_reward.py").write_text(
        "def length_reward(response_text, answer, row):\n"
        "    return len(response_text) / 10 if row['sample_index'] == 0 else -1.0\n")
    path = write_rollouts(tmp_path / "r.parquet", ["abcde", "\\boxed{7}", "xy"], ["7", "7", "7"])
    result = dcpo("score", path, "--out", tmp_path / "s.parquet",
                  "--reward", "my_reward:length_reward", cwd=tmp_path)
    assert result.code == 0, result.stderr
    scored = contracts.read_table(tmp_path / "s.parquet", "scored")
    assert scored.column("reward").to_pylist() == [0.5, -1.0, 0.2]
    assert scored.column("correct").to_pylist() == [True, False, True]
    assert contracts.read_metadata(tmp_path / "s.parquet")["reward_function"] == \
        "my_reward:length_reward"


@pytest.mark.slow
def test_a_user_reward_that_hangs_or_raises_never_stalls_the_stage(tmp_path, dcpo):
    (tmp_path / "slow_reward.py").write_text(
        "import time\n"
        "def reward(response_text, answer, row):\n"
        "    if response_text == 'hang':\n"
        "        time.sleep(600)\n"
        "    if response_text == 'raise':\n"
        "        raise ValueError('cannot judge')\n"
        "    return 1.0\n")
    path = write_rollouts(tmp_path / "r.parquet", ["fine", "hang", "fine"], ["7", "7", "7"])
    result = dcpo("score", path, "--out", tmp_path / "s.parquet", "--reward",
                  "slow_reward:reward", "--timeout", "5", "--wrong-reward", "-1",
                  cwd=tmp_path, timeout=120)
    assert result.code == 0, result.stderr
    scored = contracts.read_table(tmp_path / "s.parquet", "scored")
    assert scored.column("reward").to_pylist() == [1.0, -1.0, 1.0]
    assert scored.column("verify_timeout").to_pylist() == [False, True, False]
    assert scored.column("correct").to_pylist() == [True, False, True]

    bad = write_rollouts(tmp_path / "b.parquet", ["fine", "raise"], ["7", "7"])
    result = dcpo("score", bad, "--out", tmp_path / "b-scored.parquet", "--reward",
                  "slow_reward:reward", cwd=tmp_path)
    assert_one_line_error(result, "slow_reward:reward", "row 1", "ValueError: cannot judge")
    assert not (tmp_path / "b-scored.parquet").exists()


def test_rescoring_a_scored_file_replaces_its_rewards(tmp_path):
    path = write_rollouts(tmp_path / "r.parquet", ["\\boxed{1}", "\\boxed{2}"], ["1", "1"])
    assert run(["score", str(path), "--out", str(tmp_path / "s.parquet")]) == 0
    assert run(["score", str(tmp_path / "s.parquet"), "--out", str(tmp_path / "t.parquet"),
                "--wrong-reward", "-0.5"]) == 0
    scored = contracts.read_table(tmp_path / "t.parquet", "scored")
    assert scored.column_names.count("reward") == 1
    assert scored.column("reward").to_pylist() == [1.0, -0.5]


@pytest.mark.slow
def test_bad_inputs_give_one_line_errors(tmp_path, dcpo):
    good = write_rollouts(tmp_path / "r.parquet", ["\\boxed{1}"] * 2, ["1", "1"])
    out = tmp_path / "s.parquet"
    cases = [
        ([tmp_path / "missing.parquet"], ["missing.parquet", "no such file"]),
        ([good, good], ["more than once"]),
        ([good, "--timeout", "0"], ["--timeout"]),
        ([good, "--workers", "0"], ["--workers"]),
        ([good, "--reward", "nocolon"], ["package.module:function"]),
        ([good, "--reward", "json:nope"], ["has no function"]),
    ]
    (tmp_path / "bad.txt").write_text("not parquet")
    cases.append(([tmp_path / "bad.txt"], ["bad.txt", "not a readable Parquet file"]))
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt_id": ["a"], "response_text": ["x"]}),
                   tmp_path / "noanswer.parquet")
    cases.append(([tmp_path / "noanswer.parquet"], ["noanswer.parquet", "'answer' is missing"]))
    pq.write_table(pa.table({"prompt_id": ["a"], "response_text": ["x"], "answer": ["1"]}),
                   tmp_path / "nolength.parquet")
    cases.append(([tmp_path / "nolength.parquet", "--overlong-buffer", "2"], ["--max-length"]))
    cases.append(([tmp_path / "nolength.parquet", "--overlong-buffer", "2", "--max-length", "9"],
                  ["response_token_ids"]))
    for args, fragments in cases:
        assert_one_line_error(dcpo("score", *args, "--out", out), *fragments)
        assert not out.exists()


@pytest.mark.slow
def test_user_reward_that_raises_names_the_row(tmp_path, dcpo):
    (tmp_path / "bad_reward.py").write_text(
        "def f(response_text, answer, row):\n    return 1 / (row['sample_index'] - 1)\n")
    path = write_rollouts(tmp_path / "r.parquet", ["a", "b"], ["1", "1"])
    result = dcpo("score", path, "--out", tmp_path / "s.parquet", "--reward", "bad_reward:f",
                  cwd=tmp_path)
    assert_one_line_error(result, "row 1", "ZeroDivisionError")


# ---------------------------------------------------------------- reward levels

LEVEL_RESPONSES = ["so \\boxed{7}", "\\boxed{8}", "no box at all", "\\boxed{7} but cut"]


def level_rollouts(tmp_path):
    """Right, boxed but wrong, no box, cut off at the length limit (with a right box)."""
    return write_rollouts(tmp_path / "r.parquet", LEVEL_RESPONSES, ["7"] * 4,
                          lengths=[4, 4, 4, 16], max_new_tokens=16)


def test_no_answer_reward_gives_the_official_three_levels(tmp_path):
    path = level_rollouts(tmp_path)
    assert run(["score", str(path), "--out", str(tmp_path / "s.parquet"),
                "--no-answer-reward", "-1", "--workers", "1"]) == 0
    scored = contracts.read_table(tmp_path / "s.parquet", "scored")
    assert scored.column("reward").to_pylist() == [1.0, 0.0, -1.0, -1.0]
    assert scored.column("reward_level").to_pylist() == ["correct", "wrong", "no_answer",
                                                         "no_answer"]
    assert scored.column("correct").to_pylist() == [True, False, False, False]
    meta = contracts.read_metadata(tmp_path / "s.parquet")
    assert meta["options"]["no_answer_reward"] == -1
    assert meta["reward_levels"] == {"correct": 1, "wrong": 1, "no_answer": 2}
    assert (meta["groups"], meta["mixed_groups"], meta["round"]) == (2, 1, 0)  # p0 mixed


def test_without_the_flag_no_answer_gets_the_wrong_reward_and_a_cut_box_still_counts(tmp_path):
    path = level_rollouts(tmp_path)
    assert run(["score", str(path), "--out", str(tmp_path / "s.parquet"), "--wrong-reward",
                "-0.5", "--workers", "1"]) == 0
    scored = contracts.read_table(tmp_path / "s.parquet", "scored")
    assert scored.column("reward").to_pylist() == [1.0, -0.5, -0.5, 1.0]
    assert scored.column("reward_level").to_pylist() == ["correct", "wrong", "no_answer",
                                                         "correct"]


def test_the_three_level_example_reward_equals_the_built_in_flag(tmp_path):
    from pathlib import Path

    from dcpo_cli.options import ScoreOptions
    from dcpo_cli.stages.score import read_inputs, score_table

    examples = Path(__file__).resolve().parents[1] / "examples" / "rewards"
    table, _ = read_inputs([level_rollouts(tmp_path)])
    import sys

    sys.path.insert(0, str(examples))
    try:
        user = score_table(table, ScoreOptions(workers=1, reward="three_level:reward"))
    finally:
        sys.path.remove(str(examples))
    built_in = score_table(table, ScoreOptions(workers=1, no_answer_reward=-1.0))
    for column in ("reward", "correct"):  # (its levels go by the box alone)
        assert user.column(column).to_pylist() == built_in.column(column).to_pylist(), column


@pytest.mark.parametrize("args, fragment", [
    (["--no-answer-reward", "minus-one"], "--no-answer-reward"),
    (["--no-answer-reward", "nan"], "--no-answer-reward must be a finite number"),
])
def test_a_bad_no_answer_reward_is_one_line_and_writes_nothing(tmp_path, dcpo, args, fragment):
    path = level_rollouts(tmp_path)
    result = dcpo("score", path, "--out", tmp_path / "s.parquet", *args)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "s.parquet").exists()


# ---------------------------------------------------------------- one reward interface

def _reward_module(tmp_path, monkeypatch, source):
    (tmp_path / "my_levels.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))  # the workers inherit sys.path


def test_the_default_is_the_math_verify_reward_function_through_the_same_path(tmp_path):
    from dcpo_cli.options import DEFAULT_REWARD, ScoreOptions
    from dcpo_cli.stages.score import read_inputs, score_table

    table, _ = read_inputs([level_rollouts(tmp_path)])
    for extra in ({}, {"no_answer_reward": -1.0, "wrong_reward": -0.25}):
        default = score_table(table, ScoreOptions(workers=1, **extra))
        named = score_table(table, ScoreOptions(workers=1, reward=DEFAULT_REWARD, **extra))
        assert named.equals(default), extra
    assert default.column("reward").to_pylist() == [1.0, -0.25, -1.0, -1.0]


def test_a_reward_function_may_return_levels_that_get_the_level_rewards(tmp_path, monkeypatch):
    from dcpo_cli.options import ScoreOptions
    from dcpo_cli.stages.score import read_inputs, score_table

    _reward_module(tmp_path, monkeypatch,
                   "def strict(response_text, answer, row):\n"
                   "    if 'box' in response_text and '\\\\boxed' not in response_text:\n"
                   "        return 'no_answer'\n"
                   "    return 'correct' if response_text.startswith('so') else 'wrong'\n")
    table, _ = read_inputs([level_rollouts(tmp_path)])
    scored = score_table(table, ScoreOptions(workers=1, reward="my_levels:strict",
                                             wrong_reward=-0.25, no_answer_reward=-1.0))
    # "\boxed{7} but cut" is right by its box but cut off: no_answer under three levels
    assert scored.column("reward_level").to_pylist() == ["correct", "wrong", "no_answer",
                                                         "no_answer"]
    assert scored.column("reward").to_pylist() == [1.0, -0.25, -1.0, -1.0]
    assert scored.column("correct").to_pylist() == [True, False, False, False]


def test_a_reward_function_gets_the_rows_scalar_columns_and_the_response_length(tmp_path):
    from dcpo_cli.stages.score import read_inputs, reward_rows

    table, _ = read_inputs([level_rollouts(tmp_path)])
    rows = reward_rows(table)
    assert [row["response_length"] for row in rows] == [4, 4, 4, 16]
    assert rows[3]["finish_reason"] == "length" and rows[0]["response_text"] == "so \\boxed{7}"
    assert not any(isinstance(value, list) for row in rows for value in row.values())
    assert "response_token_ids" not in rows[0] and "sample_index" in rows[0]


@pytest.mark.parametrize("body, fragments", [
    ("return 'maybe'", ["row 0", "'maybe'", "correct, wrong, no_answer"]),
    ("return 0.5", ["--no-answer-reward", "returned a number (row 0)"]),
])
def test_a_reward_that_breaks_the_interface_is_one_line_and_writes_nothing(tmp_path, dcpo,
                                                                           body, fragments):
    (tmp_path / "odd.py").write_text(f"def f(response_text, answer, row):\n    {body}\n")
    path = level_rollouts(tmp_path)
    result = dcpo("score", path, "--out", tmp_path / "s.parquet", "--reward", "odd:f",
                  "--no-answer-reward", "-1", "--workers", "1", cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "s.parquet").exists()
