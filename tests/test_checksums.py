"""Corruption is detected (issue 25): a checkpoint's weights files are checked against the
checksums train-step recorded (files/weights_checksum.py) whenever a stage loads it, and the
SAS state file against its own checksum (files/sas_state.py). A mismatch is one line naming
the file and exit 2; `--no-verify` loads the weights anyway; a directory without a record
(a plain model directory, the tiny model) loads as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from builders import write_scored
from conftest import assert_one_line_error, run_dcpo

from dcpo_cli.errors import DcpoError
from dcpo_cli.files import contracts, weights_checksum
from dcpo_cli.files.model_source import resolve_model
from dcpo_cli.files.sas_state import SasState


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, random_model_dir):
    """A real train-step checkpoint of the test-size model (in-process: one load)."""
    from transformers import AutoTokenizer

    from dcpo_cli.train.step import TrainOptions, run_train_step

    root = tmp_path_factory.mktemp("checksums")
    tokenizer = AutoTokenizer.from_pretrained(random_model_dir)
    scored = write_scored(root / "scored.parquet", tokenizer, 0, {"p0": [1, 0, 1, 0]})
    run_train_step(random_model_dir, [scored], root / "state.json", root / "ckpt",
                   TrainOptions(warmup_steps=0, micro_batch_tokens=256))
    return root / "ckpt"


@pytest.fixture(autouse=True)
def verifying():
    weights_checksum.set_verify(True)
    yield
    weights_checksum.set_verify(True)


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset  # in the tensors, past the header
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint, tmp_path / "copy"))


@pytest.mark.slow
def test_train_step_records_every_weights_file(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    record = state[weights_checksum.RECORD_KEY]
    files = weights_checksum.weight_files(checkpoint)
    assert files and record["algorithm"] == "xxh3_128"
    assert set(record["files"]) == {p.name for p in files}
    for path in files:
        assert record["files"][path.name] == {"size": path.stat().st_size,
                                              "digest": weights_checksum.digest(path)}
    resolve_model(checkpoint)  # as written: loads


@pytest.mark.slow
def test_a_flipped_byte_in_each_weights_file_is_refused(checkpoint, tmp_path):
    for name in [p.name for p in weights_checksum.weight_files(checkpoint)]:
        copy = copy_of(checkpoint, tmp_path / name)
        flip_byte(copy / name)
        with pytest.raises(DcpoError, match=f"{name}: checksum mismatch"):
            resolve_model(copy)
        weights_checksum.set_verify(False)  # --no-verify
        assert resolve_model(copy).path == copy
        weights_checksum.set_verify(True)


def test_a_truncated_missing_or_extra_weights_file_is_refused(checkpoint, tmp_path):
    name = weights_checksum.weight_files(checkpoint)[0].name
    truncated = copy_of(checkpoint, tmp_path / "truncated")
    data = (truncated / name).read_bytes()
    (truncated / name).write_bytes(data[: len(data) - 100])
    with pytest.raises(DcpoError, match=f"{name}: {len(data) - 100} bytes, {len(data)} when "
                                        "written: truncated"):
        resolve_model(truncated)
    missing = copy_of(checkpoint, tmp_path / "missing")
    (missing / name).unlink()
    with pytest.raises(DcpoError, match=f"{name}: weights file missing"):
        resolve_model(missing)
    extra = copy_of(checkpoint, tmp_path / "extra")
    shutil.copy(extra / name, extra / "model-00002-of-00002.safetensors")
    with pytest.raises(DcpoError, match="model-00002-of-00002.safetensors: a weights file"):
        resolve_model(extra)


def test_each_of_several_weights_files_is_checked(tmp_path):
    """A sharded checkpoint: the record covers every shard and a flip in any is found."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for index, name in enumerate(names):
        (folder / name).write_bytes(bytes(range(256)) * (10 + index))
    state = {"format": "dcpo-trainer-state",
             weights_checksum.RECORD_KEY: weights_checksum.record(folder)}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    weights_checksum.verify(folder)
    for name in names:
        copy = Path(shutil.copytree(folder, tmp_path / f"flip-{name}"))
        flip_byte(copy / name, offset=7)
        with pytest.raises(DcpoError, match=f"{name}: checksum mismatch"):
            weights_checksum.verify(copy)


def test_directories_without_a_record_load_as_before(random_model_dir, tmp_path):
    assert resolve_model(random_model_dir).path == random_model_dir  # a plain model dir
    older = Path(shutil.copytree(random_model_dir, tmp_path / "older-checkpoint"))
    (older / "trainer_state.json").write_text(json.dumps({"format": "dcpo-trainer-state"}))
    flip_byte(older / "model.safetensors")
    resolve_model(older)  # no record to check against: as today


def test_the_kl_reference_model_is_verified(checkpoint, tmp_path, random_model_dir):
    from transformers import AutoTokenizer

    from dcpo_cli.train.step import TrainOptions, run_train_step

    copy = copy_of(checkpoint, tmp_path)
    flip_byte(copy / "model.safetensors")
    scored = write_scored(tmp_path / "scored.parquet",
                          AutoTokenizer.from_pretrained(random_model_dir), 0, {"p0": [1, 0]})
    options = TrainOptions(overrides={"kl_coef": 0.01}, ref_model=str(copy), warmup_steps=0)
    with pytest.raises(DcpoError, match="model.safetensors: checksum mismatch"):
        run_train_step(random_model_dir, [scored], tmp_path / "s.json", tmp_path / "out",
                       options)
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.json").exists()


@pytest.mark.slow  # four dcpo processes that load torch: ~20 s on 2 cores
def test_every_loading_stage_refuses_it_in_one_line_and_no_verify_loads_it(checkpoint,
                                                                             tmp_path):
    copy = copy_of(checkpoint, tmp_path)
    flip_byte(copy / "model.safetensors")
    prompts = tmp_path / "prompts.parquet"
    contracts.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": ["1+0=", "0+1="],
                                    "answer": ["1", "1"]}), prompts,
                          contracts.make_metadata("prompts", "test"))
    out = tmp_path / "out"
    calls = {
        "rollout": ["rollout", "--model", copy, "--prompts", prompts, "--step", "0",
                    "--batch-size", "2", "--n", "2", "--max-new-tokens", "4",
                    "--out", out / "rollouts.parquet"],
        "eval": ["eval", "--model", copy, "--benchmark", prompts, "--avg-at", "0",
                 "--max-new-tokens", "4", "--out", out / "eval"],
        "train-step": ["train-step", "--model", copy,
                       "--scored", checkpoint.parent / "scored.parquet",
                       "--state", out / "state.json", "--out", out / "ckpt"],
    }
    for name, args in calls.items():
        result = run_dcpo(*args)
        assert_one_line_error(result, "model.safetensors", "checksum mismatch", "--no-verify")
        assert not [p for p in out.rglob("*") if p.is_file()], name
    result = run_dcpo(*calls["rollout"], "--no-verify")
    assert result.code == 0, result.stderr
    assert (out / "rollouts.parquet").is_file()


# ------------------------------------------------------------------ the SAS state file


def state_file(tmp_path: Path) -> Path:
    from dcpo_cli.core.algorithms import PromptStats

    path = tmp_path / "state.json"
    SasState({"p0": PromptStats(2, 0.5, 0.5), "p1": PromptStats(1, -0.25, 1.0)}, 3).save(path)
    return path


def test_the_sas_state_has_a_checksum_and_round_trips(tmp_path):
    path = state_file(tmp_path)
    data = json.loads(path.read_text())
    assert data["checksum"].startswith("sha256:")
    assert SasState.load(path).to_json() == data


def test_a_flipped_byte_anywhere_in_the_sas_state_is_refused(tmp_path):
    """Every byte position, flipped: a checksum mismatch, or (a broken document) the file's
    own one-line error; never a state loaded with other numbers."""
    path = state_file(tmp_path)
    original = path.read_bytes()
    flipped = tmp_path / "flipped.json"
    kinds = set()
    for offset in range(len(original)):
        data = bytearray(original)
        data[offset] ^= 0x01
        flipped.write_bytes(bytes(data))
        with pytest.raises(DcpoError, match="flipped.json") as caught:
            SasState.load(flipped)
        kinds.add("checksum" if "checksum mismatch" in str(caught.value) else "format")
    assert kinds == {"checksum", "format"}


def test_a_truncated_sas_state_is_refused(tmp_path):
    path = state_file(tmp_path)
    original = path.read_bytes()
    for length in (1, len(original) // 2, len(original) - 2):
        path.write_bytes(original[:length])
        with pytest.raises(DcpoError, match="state.json: not a readable SAS state"):
            SasState.load(path)


def test_a_state_without_a_checksum_loads_as_before(tmp_path):
    path = state_file(tmp_path)
    data = json.loads(path.read_text())
    del data["checksum"]
    path.write_text(json.dumps(data))
    assert SasState.load(path).last_step == 3


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_train_step_with_a_damaged_state_is_one_line_and_exit_2(tmp_path, damage, checkpoint):
    path = state_file(tmp_path)
    if damage == "flip":
        text = path.read_text().replace('"last_step": 3', '"last_step": 2')
        path.write_text(text)
    else:
        path.write_bytes(path.read_bytes()[:40])
    scored = checkpoint.parent / "scored.parquet"
    result = run_dcpo("train-step", "--model", checkpoint, "--scored", scored,
                      "--state", path, "--out", tmp_path / "ckpt")
    assert_one_line_error(result, "state.json", "checksum mismatch" if damage == "flip"
                          else "not a readable SAS state")
    assert not (tmp_path / "ckpt").exists()
