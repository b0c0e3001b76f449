"""`train-step` under torchrun (FSDP2, gloo on CPU) against one process, DCP training state
across world sizes, a rank killed mid-update, --keep-training-state, and refusals.

Real `torch.distributed.run` processes, no mocks. Kept tiny: the test model, 16 responses."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import write_scored
from conftest import assert_one_line_error, run_dcpo

from dcpo_cli.files import contracts

REWARDS_0 = {"p0": [1, 0, 0, 1], "p1": [0, 0, 0, 1], "p2": [1, 1, 0, 1], "p3": [0, 1, 0, 0]}
REWARDS_1 = {"p0": [1, 1, 0, 1], "p1": [0, 1, 0, 0], "p2": [1, 0, 1, 1], "p3": [0, 1, 1, 0]}
REWARDS_2 = {"p0": [0, 1, 0, 1], "p1": [1, 1, 0, 0], "p2": [1, 0, 0, 0], "p3": [0, 1, 1, 1]}
OPTIONS = ["--lr", "1e-3", "--warmup-steps", "2", "--micro-batch-tokens", "64"]
# Metrics that measure the run rather than the update.
RUN_METRICS = {"checkpoint", "compute_seconds", "load_seconds", "seconds", "tokens_per_second",
               "world_size", "peak_cpu_rss_gib", "peak_cpu_rss_gib_per_rank",
               "peak_gpu_memory_gib", "peak_gpu_memory_gib_per_rank"}


def torchrun(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m dcpo_cli train-step ARGS`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "dcpo_cli", "train-step", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def step(model, scored, state, out, *extra, nproc: int = 1):
    args = ["train-step", "--model", model, "--scored", scored, "--state", state, "--out",
            out, *OPTIONS, *extra]
    if nproc > 1:
        args += ["--nproc-per-node", str(nproc)]
    result = run_dcpo(*args)
    assert result.code == 0, result.stderr[-3000:]
    return out


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors")


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= atol, worst


def assert_same_records(a: Path, b: Path) -> None:
    ra = contracts.read_table(a / "train_records.parquet", "train_records").to_pylist()
    rb = contracts.read_table(b / "train_records.parquet", "train_records").to_pylist()
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], abs=1e-5, nan_ok=True), key
            else:
                assert x[key] == y[key], key


def changed(before: Path, after: Path) -> bool:
    wa, wb = weights(before), weights(after)
    return any(not torch.equal(wa[k], wb[k]) for k in wa)


def in_process(model, scored, state, out, **options):
    """One step without a subprocess (the single-process path; faster to start)."""
    from dcpo_cli.train.step import TrainOptions, run_train_step

    run_train_step(model, [scored], state, out,
                   TrainOptions(lr=1e-3, warmup_steps=2, micro_batch_tokens=64, **options),
                   show_progress=False)
    return out


@pytest.fixture(scope="module")
def scored_files(tmp_path_factory, random_model_dir):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("scored")
    tokenizer = AutoTokenizer.from_pretrained(random_model_dir)
    return [write_scored(root / f"scored-{i}.parquet", tokenizer, i, rewards)
            for i, rewards in enumerate((REWARDS_0, REWARDS_1, REWARDS_2))]


@pytest.fixture(scope="module")
def run(tmp_path_factory, random_model_dir, scored_files):
    """Step 0 in one process (run `one/`) and in two (run `two/`), each its own folder."""
    root, scored = tmp_path_factory.mktemp("dist"), scored_files
    for name, nproc in (("one", 1), ("two", 2)):
        (root / name).mkdir()
        step(random_model_dir, scored[0], root / name / "state.json", root / name / "ckpt-1",
             nproc=nproc)
    return root, scored


@pytest.mark.slow  # two torchrun jobs: 35 s on 2 shared cores
def test_two_processes_train_as_one(run, random_model_dir):
    root, _ = run
    one, two = root / "one" / "ckpt-1", root / "two" / "ckpt-1"
    assert changed(random_model_dir, one)
    assert_same_weights(one, two)
    assert_same_records(one, two)
    assert (root / "one" / "state.json").read_bytes() == (root / "two" / "state.json").read_bytes()
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m1.keys() == m2.keys()
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert len(m2["peak_cpu_rss_gib_per_rank"]) == 2 and m2["peak_cpu_rss_gib"] > 0
    for key in m1.keys() - RUN_METRICS:
        if isinstance(m1[key], float):
            assert m1[key] == pytest.approx(m2[key], rel=1e-5, abs=1e-6), key
        else:
            assert m1[key] == m2[key], key
    # The weights directory holds the model's own dtype (the tiny model is fp32); the fp32
    # master weights and the optimizer live in training_state/, one shard per rank.
    assert {t.dtype for t in weights(two).values()} == {torch.float32}
    assert len(list((two / "training_state").glob("*.distcp"))) == 2
    assert len(list((one / "training_state").glob("*.distcp"))) == 1


@pytest.mark.slow
def test_training_state_reshards_between_world_sizes(run, tmp_path):
    root, scored = run
    results = {}
    for source, nproc in (("one", 1), ("one", 2), ("two", 1)):
        folder = tmp_path / f"{source}-{nproc}"
        folder.mkdir()
        shutil.copy(root / source / "state.json", folder / "state.json")
        results[source, nproc] = step(root / source / "ckpt-1", scored[1],
                                      folder / "state.json", folder / "ckpt-2", nproc=nproc)
    same_count = results["one", 1]
    assert changed(root / "one" / "ckpt-1", same_count)
    assert_same_weights(results["one", 2], same_count)  # 1 -> 2
    assert_same_weights(results["two", 1], same_count)  # 2 -> 1
    for key in ("one", 2), ("two", 1):
        assert_same_records(results[key], same_count)
        trainer = json.loads((results[key] / "trainer_state.json").read_text())
        assert trainer["global_step"] == 2 and trainer["optimizer_updates"] == 8


@pytest.mark.slow
def test_a_rank_killed_mid_update_leaves_nothing_and_reruns(run, random_model_dir, tmp_path):
    root, scored = run
    state, out = tmp_path / "state.json", tmp_path / "ckpt-1"
    # Test hook (distributed.die_here_for_tests): rank 1 exits in update 2 of 4.
    killed = torchrun("--model", random_model_dir, "--scored", scored[0], "--state", state,
                      "--out", out, *OPTIONS, env={"DCPO_TEST_KILL_AT": "1:2"})
    assert killed.returncode != 0
    assert not out.exists() and not state.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary left either
    step(random_model_dir, scored[0], state, out, nproc=2)
    assert (root / "two" / "ckpt-1" / "model.safetensors").read_bytes() == \
        (out / "model.safetensors").read_bytes()
    assert state.read_bytes() == (root / "two" / "state.json").read_bytes()


@pytest.mark.slow
def test_keep_training_state_keeps_the_newest(scored_files, random_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    scored = scored_files
    runs, state = tmp_path / "run", tmp_path / "state.json"
    model = random_model_dir
    for i in range(3):
        model = in_process(model, scored[i], state, runs / f"ckpt-{i + 1}")
    holding = sorted(p.parent.name for p in runs.glob("*/training_state"))
    assert holding == ["ckpt-3"]
    assert not list(runs.glob("*/.training_state*"))

    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    weight_bytes = (runs / "ckpt-3" / "model.safetensors").stat().st_size
    newest_state = size(runs / "ckpt-3" / "training_state")
    # fp32 master weights + two AdamW moments: about 3x the (fp32, tied) weights file
    assert 2.5 * weight_bytes < newest_state < 4.5 * weight_bytes
    for i in (1, 2, 3):
        ckpt = runs / f"ckpt-{i}"
        assert AutoModelForCausalLM.from_pretrained(ckpt) is not None
        assert size(ckpt) == pytest.approx(size(runs / "ckpt-3") - newest_state, rel=0.05) \
            if i < 3 else True
    # A pruned checkpoint cannot continue by accident ...
    other = tmp_path / "other-state.json"
    shutil.copy(runs / "ckpt-1" / "sas_state.json", other)
    refused = run_dcpo("train-step", "--model", runs / "ckpt-1", "--scored", scored[1],
                       "--state", other, "--out", tmp_path / "branch" / "ckpt-2", *OPTIONS)
    assert_one_line_error(refused, "ckpt-1", "no training state", "--reset-optimizer")
    assert not (tmp_path / "branch").exists()
    # ... and continues with fresh moments when asked, the schedule going on.
    out = in_process(runs / "ckpt-1", scored[1], other, tmp_path / "branch" / "ckpt-2",
                     reset_optimizer=True)
    trainer = json.loads((out / "trainer_state.json").read_text())
    assert trainer["global_step"] == 2 and trainer["optimizer_updates"] == 8


@pytest.mark.slow  # torchrun and train-step subprocesses: ~19 s
def test_bad_inputs(scored_files, random_model_dir, tmp_path):
    from dcpo_cli.tiny.model import TEST_SIZE, build_random_model_dir

    scored = scored_files
    result = run_dcpo("train-step", "--model", random_model_dir, "--scored", scored[0],
                      "--state", tmp_path / "s.json", "--out", tmp_path / "c",
                      "--nproc-per-node", "0")
    assert_one_line_error(result, "--nproc-per-node 0", "at least 1")
    # A mini-batch of one prompt's 4 responses cannot give each of 5 processes a response.
    result = run_dcpo("train-step", "--model", random_model_dir, "--scored", scored[0],
                      "--state", tmp_path / "s.json", "--out", tmp_path / "c",
                      "--mini-batch-size", "1", "--nproc-per-node", "5")
    assert_one_line_error(result, "scored-0.parquet", "mini-batch of 4 responses",
                          "5 processes")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    from dcpo_cli.errors import DcpoError

    with pytest.raises(DcpoError, match="--cpu-offload" if torch.cuda.is_available()
                       else "without a GPU"):
        in_process(random_model_dir, scored[0], tmp_path / "s.json", tmp_path / "c",
                   cpu_offload=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    # A training state written for another model (another shape) beside these weights.
    wider = dataclasses.replace(TEST_SIZE, hidden_size=TEST_SIZE.hidden_size * 2)
    other_model = build_random_model_dir(tmp_path / "wide-model", wider)
    other = in_process(other_model, scored[0], tmp_path / "wide" / "state.json",
                       tmp_path / "wide" / "ckpt")
    mixed = in_process(random_model_dir, scored[0], tmp_path / "mixed-run" / "state.json",
                       tmp_path / "mixed-run" / "mixed")
    shutil.rmtree(mixed / "training_state")
    shutil.copytree(other / "training_state", mixed / "training_state")
    state = tmp_path / "mixed-run" / "state.json"
    before = state.read_bytes()
    result = run_dcpo("train-step", "--model", mixed, "--scored", scored[1], "--state", state,
                      "--out", tmp_path / "after-mixed", *OPTIONS)
    assert_one_line_error(result, "mixed/training_state", "another model")
    assert not (tmp_path / "after-mixed").exists() and state.read_bytes() == before


@pytest.mark.slow  # two more train-steps (one a torchrun job)
def test_two_processes_train_as_one_with_the_kl_to_the_reference(run, random_model_dir,
                                                                  tmp_path):
    """GRPO's KL term reads reference log-probs that each rank computes for its own rows;
    kl_ref (a metric over all rows) is gathered on rank 0."""
    _, scored = run
    kl = ["--algo", "grpo", "--kl-coef", "0.5"]
    one = step(random_model_dir, scored[0], tmp_path / "s1.json", tmp_path / "one", *kl)
    two = step(random_model_dir, scored[0], tmp_path / "s2.json", tmp_path / "two", *kl,
               nproc=2)
    assert_same_weights(one, two)
    m1 = json.loads((one / "metrics.json").read_text())
    m2 = json.loads((two / "metrics.json").read_text())
    assert m1["kl_ref"] == m2["kl_ref"] == pytest.approx(0.0, abs=1e-12)  # policy = reference
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5, abs=1e-6)
    # From the step-1 checkpoint the reference is still the base model: kl_ref > 0, the same.
    again = [step(ckpt, scored[1], state, tmp_path / f"{ckpt.name}-2", *kl, nproc=nproc)
             for ckpt, state, nproc in ((one, tmp_path / "s1.json", 1),
                                        (two, tmp_path / "s2.json", 2))]
    k1, k2 = (json.loads((c / "metrics.json").read_text())["kl_ref"] for c in again)
    assert k1 > 0 and k2 == pytest.approx(k1, rel=1e-4)
    assert_same_weights(*again)


def test_keep_training_state_prunes_only_the_line_of_the_new_checkpoint(scored_files,
                                                                         random_model_dir,
                                                                         tmp_path):
    """Two runs from the same base model in one folder: each prunes its own ancestors."""
    scored, runs = scored_files, tmp_path / "ckpts"
    a1 = in_process(random_model_dir, scored[0], tmp_path / "a.json", runs / "a-1")
    b1 = in_process(random_model_dir, scored[0], tmp_path / "b.json", runs / "b-1")
    a2 = in_process(a1, scored[1], tmp_path / "a.json", runs / "a-2")
    assert json.loads((a2 / "trainer_state.json").read_text())["parent_checkpoint"] == "a-1"
    assert sorted(p.parent.name for p in runs.glob("*/training_state")) == ["a-2", "b-1"]
    in_process(b1, scored[1], tmp_path / "b.json", runs / "b-2")
    assert sorted(p.parent.name for p in runs.glob("*/training_state")) == ["a-2", "b-2"]
