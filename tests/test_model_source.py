"""Hub model ids wherever a model is named: a Hugging Face cache laid out on disk for the tiny
model under a made-up id (HF_HOME, HF_HUB_OFFLINE=1), resolved by huggingface_hub itself;
rollout, train-step and eval by id give what they give by directory, and say which commit
they used; an uncached id offline is one line, exit 2, nothing written. Also the cheap
weights identity."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import Result, assert_one_line_error

from dcpo_cli.errors import DcpoError
from dcpo_cli.files import contracts
from dcpo_cli.files.model_source import ModelSource, model_identity, parse_hub_spec, resolve_model

REPO_ID = "dcpo-test/tiny-math"
COMMIT = hashlib.sha1(b"dcpo tiny test model").hexdigest()  # a made-up 40-hex commit


def make_hub_cache(hf_home: Path, repo_id: str, model_dir: Path, commit: str) -> Path:
    """The layout huggingface_hub's cache uses: HF_HOME/hub/models--org--name/ with blobs/
    (files by content hash), snapshots/<commit>/ (links to the blobs) and refs/main."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for item in sorted(model_dir.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(item.read_bytes()).hexdigest()
        shutil.copyfile(item, blob)
        (snapshot / item.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def run_offline(hf_home: Path, *args, timeout: float = 600) -> Result:
    """`dcpo ARGS` as a real process with HF_HOME and HF_HUB_OFFLINE=1 set before it starts
    (huggingface_hub reads them at import)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN")}
    env.update(COLUMNS="200", HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "dcpo_cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ok(result: Result) -> Result:
    assert result.code == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory, tiny) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    make_hub_cache(home, REPO_ID, tiny / "model", COMMIT)
    return home


# ---------------------------------------------------------------- resolution, in process

def test_the_fake_cache_is_what_huggingface_hub_resolves(hf_home):
    from huggingface_hub import snapshot_download

    snapshot = hf_home / "hub" / "models--dcpo-test--tiny-math" / "snapshots" / COMMIT
    for revision in (None, "main", COMMIT):
        found = snapshot_download(REPO_ID, revision=revision, cache_dir=hf_home / "hub",
                                  local_files_only=True)
        assert Path(found) == snapshot
    assert (snapshot / "config.json").is_symlink()


@pytest.mark.parametrize(("text", "parsed"), [
    ("Qwen/Qwen2.5-Math-7B", ("Qwen/Qwen2.5-Math-7B", None)),
    ("gpt2", ("gpt2", None)),
    ("org/name@v1.0", ("org/name", "v1.0")),
    (f"org/name@{COMMIT}", ("org/name", COMMIT)),
    ("runs/a/ckpt/step-000001", None),  # three parts: only a path
    ("./model", None), ("/abs/model", None), ("~/model", None),
    ("org/name@", None), ("org--x/name", None), ("org/na..me", None), ("org/name-", None),
])
def test_hub_spec_parsing(text, parsed):
    assert parse_hub_spec(text) == parsed


def test_a_local_directory_wins_and_a_missing_path_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    local = resolve_model("org/name")  # a directory of that name is used, not the Hub
    assert local.path == Path("org/name") and local.repo_id is None and local.commit is None
    with pytest.raises(DcpoError, match="runs/x/step-1: no such model directory"):
        resolve_model("runs/x/step-1")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DcpoError, match="file: not a model directory"):
        resolve_model("file")


def test_an_uncached_id_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at call time as well as at import
    with pytest.raises(DcpoError) as caught:
        resolve_model("dcpo-test/not-cached-anywhere@main")
    message = str(caught.value)
    assert message.startswith("dcpo-test/not-cached-anywhere@main: not in the Hugging Face")
    assert "HF_HUB_OFFLINE" in message and "hf download dcpo-test/not-cached-anywhere" in message
    assert "\n" not in message


def _hub_error(name: str):
    """One of huggingface_hub's errors as snapshot_download raises it (a fake HTTP response:
    no network here)."""
    from types import SimpleNamespace

    from huggingface_hub import errors

    kind = getattr(errors, name)
    if issubclass(kind, errors.HfHubHTTPError):
        return kind("from the Hub", response=SimpleNamespace(headers={}, request=None))
    return kind("cannot find it")


@pytest.mark.parametrize(("error", "fragment"), [
    ("RepositoryNotFoundError", "nor a model on the Hugging Face Hub (if it is private, log in"),
    ("GatedRepoError", "gated on the Hugging Face Hub: accept its terms"),
    ("RevisionNotFoundError", "has no revision 'v9'; name a branch, tag or commit"),
    ("LocalEntryNotFoundError", "the Hugging Face Hub cannot be reached and it is not in the"),
])
def test_hub_errors_become_one_line_naming_the_id(monkeypatch, error, fragment):
    import huggingface_hub

    def fails(repo_id, **kwargs):
        raise _hub_error(error)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fails)
    with pytest.raises(DcpoError) as caught:
        resolve_model("org/model@v9")
    message = str(caught.value)
    assert message.startswith("org/model@v9: ") and fragment in message and "\n" not in message


# ---------------------------------------------------------------- the cheap identity

def test_identity_of_a_plain_directory(tmp_path, tiny):
    model = tmp_path / "m"
    shutil.copytree(tiny / "model", model)  # copy2: times preserved
    first = model_identity(model)
    assert first == model_identity(tiny / "model")  # a faithful copy is the same model
    (model / "eval").mkdir()
    (model / "eval" / "summary.json").write_text("{}")  # results inside do not count
    assert model_identity(model) == first
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    before = weights.stat().st_mtime_ns
    weights.write_bytes(bytes(data))  # same size, other bytes: a new mtime
    # (a coarse file-system clock can give the rewrite the same stamp; a real rewrite is
    # later than the first write, so set it apart explicitly rather than sleep)
    os.utime(weights, ns=(before + 1_000_000, before + 1_000_000))
    assert model_identity(model) != first
    changed = model_identity(model)
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    assert model_identity(model) != changed


def test_identity_of_a_checkpoint_is_its_trainer_state(tmp_path, tiny):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny / "model", ckpt)
    (ckpt / "trainer_state.json").write_text('{"global_step": 1}')
    first = model_identity(ckpt)
    moved = tmp_path / "elsewhere"
    shutil.copytree(ckpt, moved, copy_function=shutil.copyfile)  # new mtimes everywhere
    assert model_identity(moved) == first
    (moved / "trainer_state.json").write_text('{"global_step": 2}')
    assert model_identity(moved) != first


def test_identity_of_a_hub_snapshot_is_its_commit(tmp_path, tiny):
    source = ModelSource(REPO_ID, tiny / "model", REPO_ID, None, COMMIT)
    other = ModelSource(REPO_ID, tmp_path, REPO_ID, "main", COMMIT)
    assert model_identity(source) == model_identity(other) != model_identity(tiny / "model")
    newer = ModelSource(REPO_ID, tiny / "model", REPO_ID, None, "f" * 40)
    assert model_identity(newer) != model_identity(source)


# ---------------------------------------------------------------- the stages, by id

ROLLOUT = ("--batch-size", "4", "--n", "2", "--max-new-tokens", "12", "--seed", "3",
           "--engine", "hf", "--step", "0")


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory, tiny, hf_home):
    """Step 0 by directory, by id and by id@commit."""
    out = tmp_path_factory.mktemp("rollouts")
    models = {"dir": tiny / "model", "id": REPO_ID, "commit": f"{REPO_ID}@{COMMIT}"}
    for name, model in models.items():
        ok(run_offline(hf_home, "rollout", "--model", model, "--prompts", tiny / "train.parquet",
                       "--out", out / f"{name}.parquet", *ROLLOUT))
    ok(run_offline(hf_home, "score", out / "dir.parquet", "--out", out / "scored.parquet"))
    return out


@pytest.mark.slow  # real dcpo subprocesses: 7-11 s
def test_rollout_by_id_matches_the_directory_and_names_the_commit(rollouts, tiny):
    by_dir = pq.read_table(rollouts / "dir.parquet")
    for name in ("id", "commit"):
        assert pq.read_table(rollouts / f"{name}.parquet").to_pylist() == by_dir.to_pylist()
    meta = contracts.read_metadata(rollouts / "id.parquet")
    assert meta["model"] == REPO_ID and meta["model_id"] == REPO_ID
    assert meta["model_commit"] == COMMIT
    assert contracts.read_metadata(rollouts / "commit.parquet")["model_commit"] == COMMIT
    local = contracts.read_metadata(rollouts / "dir.parquet")
    assert local["model"] == str(tiny / "model") and local["model_id"] is None
    assert local["model_commit"] is None and local["model_fingerprint"] != meta["model_fingerprint"]


@pytest.mark.slow  # real dcpo subprocesses: 7-11 s
def test_train_step_by_id_matches_the_directory_and_records_the_base(rollouts, tiny, hf_home,
                                                                     tmp_path):
    from safetensors.torch import load_file

    for name, model in (("dir", tiny / "model"), ("id", REPO_ID)):
        ok(run_offline(hf_home, "train-step", "--model", model, "--scored",
                       rollouts / "scored.parquet", "--state", tmp_path / f"{name}.json",
                       "--out", tmp_path / name, "--lr", "1e-3", "--warmup-steps", "0",
                       "--mini-batch-size", "2"))
    by_dir, by_id = (load_file(tmp_path / name / "model.safetensors") for name in ("dir", "id"))
    assert by_dir.keys() == by_id.keys()
    assert all((by_dir[key] == by_id[key]).all() for key in by_dir)
    base = load_file(tiny / "model" / "model.safetensors")
    assert any((by_id[key] != base[key]).any() for key in base)  # it did train
    state = json.loads((tmp_path / "id" / "trainer_state.json").read_text())
    assert state["base_model"] == REPO_ID and state["base_model_revision"] == COMMIT
    local = json.loads((tmp_path / "dir" / "trainer_state.json").read_text())
    assert local["base_model"] == str((tiny / "model").resolve())
    assert local["base_model_revision"] is None


@pytest.mark.slow  # real dcpo subprocesses: 7-11 s
def test_the_kl_reference_of_a_run_from_an_id_is_that_commit(rollouts, hf_home, tmp_path):
    """GRPO's KL: the first step's reference is the policy itself (the id, not fetched
    twice); a later step resolves the recorded id@commit from the cache, offline."""
    args = ("--scored", rollouts / "scored.parquet", "--state", tmp_path / "s.json",
            "--algo", "grpo", "--lr", "1e-3", "--warmup-steps", "0", "--mini-batch-size", "2")
    ok(run_offline(hf_home, "train-step", "--model", REPO_ID, "--out", tmp_path / "c1", *args))
    state = json.loads((tmp_path / "c1" / "trainer_state.json").read_text())
    assert (state["ref_model"], state["ref_model_revision"]) == (REPO_ID, COMMIT)
    # The same responses as step 1, as if c1 sampled them (on-policy, --max-staleness 0).
    rollouts_1 = tmp_path / "scored-1.parquet"
    table = pq.read_table(rollouts / "scored.parquet")
    table = table.set_column(table.schema.get_field_index("step"), "step",
                             pa.array([1] * table.num_rows, pa.int64()))
    meta = {**contracts.read_metadata(rollouts / "scored.parquet"), "step": 1,
            "policy_step": 1, "policy_model": str(tmp_path / "c1")}
    contracts.write_table(table, rollouts_1, meta)
    ok(run_offline(hf_home, "train-step", "--model", tmp_path / "c1", "--out", tmp_path / "c2",
                   "--scored", rollouts_1, "--state", tmp_path / "s.json", "--algo", "grpo",
                   "--lr", "1e-3", "--warmup-steps", "0", "--mini-batch-size", "2",
                   "--metrics-log", tmp_path / "m.jsonl"))
    state = json.loads((tmp_path / "c2" / "trainer_state.json").read_text())
    assert (state["ref_model"], state["ref_model_revision"]) == (REPO_ID, COMMIT)
    assert json.loads((tmp_path / "m.jsonl").read_text())["kl_ref"] > 0


@pytest.mark.slow  # real dcpo subprocesses: 7-11 s
def test_eval_by_id_matches_the_directory_and_names_the_commit(tiny, hf_home, tmp_path):
    args = ("--benchmark", tiny / "test.parquet", "--limit", "4", "--avg-at", "2",
            "--max-new-tokens", "12", "--engine", "hf", "--seed", "1")
    for name, model in (("dir", tiny / "model"), ("id", REPO_ID)):
        ok(run_offline(hf_home, "eval", "--model", model, "--out", tmp_path / name, *args))
    by_dir, by_id = (json.loads((tmp_path / name / "summary.json").read_text())
                     for name in ("dir", "id"))
    assert by_id.pop("_model") == {"model": REPO_ID, "model_id": REPO_ID,
                                   "model_commit": COMMIT,
                                   "model_fingerprint": model_identity(ModelSource(
                                       REPO_ID, Path(), REPO_ID, None, COMMIT))}
    assert by_dir.pop("_model")["model_commit"] is None
    assert by_id == by_dir and by_id["average"]["problems"] == 4
    samples = [pq.read_table(next((tmp_path / name).glob("*/samples.parquet"))).to_pylist()
               for name in ("dir", "id")]
    assert samples[0] == samples[1]
    options = json.loads((tmp_path / "id" / "options.json").read_text())
    assert options["model_id"] == REPO_ID and options["model_commit"] == COMMIT


@pytest.mark.slow
def test_offline_without_a_cached_copy_is_one_line_and_writes_nothing(tiny, hf_home, tmp_path,
                                                                       rollouts):
    missing = "dcpo-test/not-cached"
    commands = {
        "rollout": ("rollout", "--model", missing, "--prompts", tiny / "train.parquet",
                    "--out", tmp_path / "r.parquet", *ROLLOUT),
        "train-step": ("train-step", "--model", missing, "--scored",
                       rollouts / "scored.parquet", "--state", tmp_path / "state.json",
                       "--out", tmp_path / "ckpt"),
        "eval": ("eval", "--model", missing, "--benchmark", tiny / "test.parquet",
                 "--out", tmp_path / "eval", "--engine", "hf"),
    }
    for args in commands.values():
        assert_one_line_error(run_offline(hf_home, *args), missing, "HF_HUB_OFFLINE")
    assert list(tmp_path.iterdir()) == []
