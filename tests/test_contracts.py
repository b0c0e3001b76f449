"""The file contracts: validation messages, atomic writes, metadata."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dcpo_cli.errors import DcpoError
from dcpo_cli.files import contracts


def rollout_row(**overrides):
    row = {
        "step": 0, "prompt_id": "p0", "sample_index": 0, "prompt_text": "1+1=",
        "prompt_token_ids": [1, 2], "response_text": "\\boxed{2}",
        "response_token_ids": [3, 4], "response_logprobs": [-0.1, -0.2],
        "finish_reason": "stop", "answer": "2",
    }
    row.update(overrides)
    return row


def rollout_table(rows):
    schema = pa.schema([(name, kind) for name, kind in contracts.ROLLOUT_COLUMNS.items()])
    return pa.Table.from_pylist(rows, schema=schema)


def test_valid_rollouts_round_trip_with_metadata(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello")
    path = tmp_path / "rollouts.parquet"
    meta = contracts.make_metadata("rollouts", "rollout", step=3, options={"n": 4}, inputs=[src])
    contracts.write_table(rollout_table([rollout_row()]), path, meta)
    table = contracts.read_table(path, "rollouts")
    assert table.num_rows == 1
    stored = contracts.read_metadata(path)
    assert stored["step"] == 3 and stored["stage"] == "rollout"
    assert stored["options"] == {"n": 4}
    assert stored["inputs"][str(src)] == contracts.file_checksum(src)
    assert list(tmp_path.iterdir()) == sorted([src, path]) or set(tmp_path.iterdir()) == {src, path}


def test_missing_column_is_named(tmp_path):
    path = tmp_path / "rollouts.parquet"
    pq.write_table(rollout_table([rollout_row()]).drop(["response_text"]), path)
    with pytest.raises(DcpoError, match=r"^rollouts.parquet: column 'response_text' is missing$"):
        contracts.read_table(path, "rollouts")


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "r.parquet"
    table = rollout_table([rollout_row()]).set_column(
        1, "prompt_id", pa.array([7], pa.int64()))
    pq.write_table(table, path)
    with pytest.raises(DcpoError, match="column 'prompt_id' has type int64, expected string"):
        contracts.read_table(path, "rollouts")


def test_truncated_and_empty_files(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(rollout_table([rollout_row()]), good)
    truncated = tmp_path / "cut.parquet"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(DcpoError, match="^cut.parquet: not a readable Parquet file"):
        contracts.read_table(truncated, "rollouts")
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(DcpoError, match="^empty.parquet: the file is empty$"):
        contracts.read_table(empty, "rollouts")


def test_zero_rows_and_duplicate_prompt_ids(tmp_path):
    path = tmp_path / "none.parquet"
    pq.write_table(rollout_table([]), path)
    with pytest.raises(DcpoError, match="has no rows"):
        contracts.read_table(path, "rollouts")
    prompts = pa.table({"prompt_id": ["a", "a"], "prompt": ["x", "y"], "answer": ["1", "2"]})
    dup = tmp_path / "p.parquet"
    pq.write_table(prompts, dup)
    with pytest.raises(DcpoError, match="'prompt_id' has duplicate values"):
        contracts.read_table(dup, "prompts")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError), contracts.atomic_path(path) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_invalid_table_is_not_written(tmp_path):
    path = tmp_path / "out.parquet"
    bad = rollout_table([rollout_row()]).drop(["answer"])
    with pytest.raises(DcpoError, match="'answer' is missing"):
        contracts.write_table(bad, path, contracts.make_metadata("rollouts", "rollout"))
    assert not path.exists()


def test_an_output_never_replaces_a_directory(tmp_path):
    target = tmp_path / "run"
    (target / "ckpt").mkdir(parents=True)
    (target / "ckpt" / "weights").write_text("precious")
    for write in (lambda: contracts.write_json({"a": 1}, target),
                  lambda: contracts.write_table(rollout_table([rollout_row()]), target,
                                            contracts.make_metadata("rollouts", "rollout"))):
        with pytest.raises(DcpoError, match="is an existing directory"):
            write()
    assert (target / "ckpt" / "weights").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_atomic_directory_is_complete_when_it_appears(tmp_path):
    target = tmp_path / "ckpt"
    with contracts.atomic_path(target) as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "weights").write_text("one")
        assert not target.exists()
    assert (target / "sub" / "weights").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_write_json_is_readable(tmp_path):
    contracts.write_json({"b": 1, "a": [1.5]}, tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": [1.5], "b": 1}
