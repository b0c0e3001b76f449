"""Per-token lists line up with the token ids (issue 25): a rollouts or scored file whose
`response_logprobs` (or another per-token list, or `response_length`) disagrees with
`response_token_ids` in one row is refused by `dcpo score` and `dcpo train-step`: one line
naming the file, the row and the column, exit 2, nothing written."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import write_rollouts, write_scored
from conftest import assert_one_line_error, run_dcpo

from dcpo_cli.errors import DcpoError
from dcpo_cli.files import contracts
from dcpo_cli.train.inputs import load_scored

ROW = 2  # the row each crafted file breaks (0-based, as the messages count)


def tamper(path, column: str, change) -> None:
    """Rewrite `path` with row ROW of `column` replaced by change(row's token ids, value);
    a column the file lacks is added (token-count-long lists, or the lengths)."""
    table = pq.read_table(path)
    ids = table.column("response_token_ids").to_pylist()
    if column in table.column_names:
        values = table.column(column).to_pylist()
        kind = table.schema.field(column).type
        table = table.drop_columns([column])
    elif column == "response_length":
        values, kind = [len(x) for x in ids], pa.int64()
    else:
        values, kind = [[1] * len(x) for x in ids], pa.list_(pa.int8())
    values[ROW] = change(ids[ROW], values[ROW])
    table = table.append_column(pa.field(column, kind), pa.array(values, kind))
    pq.write_table(table, path)  # keeps the dcpo metadata of the schema


# column, how row ROW is broken, what the line says
CASES = [
    ("response_logprobs", lambda ids, v: v + [-0.5], "has {n1} values"),
    ("response_logprobs", lambda ids, v: v[:-1], "has {n_1} values"),
    ("response_logprobs", lambda ids, v: [], "has 0 values"),
    ("response_logprobs", lambda ids, v: None, "has no value"),
    ("response_mask", lambda ids, v: v + [1], "has {n1} values"),
    ("response_length", lambda ids, v: v + 3, "has {n3},"),
]
IDS = ["logprobs-longer", "logprobs-shorter", "logprobs-empty", "logprobs-null",
       "other-list", "length"]


def expected_fragments(path, column, template):
    n = len(pq.read_table(path).column("response_token_ids")[ROW].as_py())
    return (path.name, f"row {ROW}:", f"column '{column}'",
            template.format(n1=n + 1, n_1=n - 1, n3=n + 3), f"has {n} tokens")


@pytest.mark.parametrize(("column", "change", "template"), CASES, ids=IDS)
def test_score_refuses_misaligned_token_lists(tmp_path, column, change, template):
    rollouts = write_rollouts(tmp_path / "rollouts.parquet", ["\\boxed{1}"] * 4, ["1"] * 4,
                              lengths=[3, 4, 5, 6])
    tamper(rollouts, column, change)
    result = run_dcpo("score", rollouts, "--out", tmp_path / "scored.parquet", "--workers", "1")
    assert_one_line_error(result, *expected_fragments(rollouts, column, template))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollouts.parquet"]


@pytest.mark.parametrize(("column", "change", "template"), CASES, ids=IDS)
def test_train_step_reads_refuse_misaligned_token_lists(tmp_path, tokenizer, column, change,
                                                        template):
    """What train-step reads its --scored files with (load_scored, through the contract)."""
    scored = write_scored(tmp_path / "scored.parquet", tokenizer, 0, {"p0": [1, 0, 1, 0]})
    tamper(scored, column, change)
    fragments = expected_fragments(scored, column, template)
    with pytest.raises(DcpoError) as caught:
        load_scored([scored])
    assert all(f in str(caught.value) for f in fragments), (str(caught.value), fragments)


@pytest.mark.slow
def test_train_step_refuses_them_with_one_line_and_writes_nothing(tmp_path, tokenizer,
                                                                  random_model_dir):
    scored = write_scored(tmp_path / "scored.parquet", tokenizer, 0, {"p0": [1, 0, 1, 0]})
    tamper(scored, "response_logprobs", lambda ids, v: v + [-1.0])
    result = run_dcpo("train-step", "--model", random_model_dir, "--scored", scored,
                      "--state", tmp_path / "state.json", "--out", tmp_path / "ckpt")
    assert_one_line_error(result, "scored.parquet", f"row {ROW}:", "'response_logprobs'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored.parquet"]


def test_aligned_lists_and_a_column_with_no_values_pass():
    ids = pa.array([[1, 2], [3], [4, 5, 6]])
    table = pa.table({"response_token_ids": ids,
                      "response_logprobs": pa.array([[0.1, 0.2], [0.3], [0.4, 0.5, 0.6]]),
                      "response_mask": pa.array([None, None, None], pa.list_(pa.int8())),
                      "response_length": [2, 1, 3], "response_text": ["a", "b", "c"]})
    contracts.check_token_lists(table, "ok.parquet")  # no error
    assert contracts.per_token_columns(table) == ["response_logprobs", "response_mask"]
