"""`dcpo tiny init`: the arithmetic task, the warm start, the files it writes, determinism."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_dcpo
from hypothesis import given, settings
from hypothesis import strategies as st

from dcpo_cli.files import contracts
from dcpo_cli.rewards import extract_boxed
from dcpo_cli.tiny import build as tiny

PROBLEMS = tiny.all_problems()


def evaluate(expression: str) -> int:
    """The arithmetic, recomputed independently of the task code (digits, + - * and parens)."""
    assert re.fullmatch(r"[0-9+\-*()]+", expression)
    return int(eval(expression, {"__builtins__": {}}))  # noqa: S307 - checked characters


def sha256_tree(directory) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two inits with one seed (test size), through the CLI."""
    base = tmp_path_factory.mktemp("tiny")
    results = [run_dcpo("tiny", "init", str(base / name), "--seed", "5", "--size", "test")
               for name in ("a", "b")]
    for result in results:
        assert result.code == 0, result.stderr
    return base / "a", base / "b", results[0]


# ------------------------------------------------------------------ the task itself


def test_problems_are_unique_and_answers_right():
    expressions = [p.expression for p in PROBLEMS]
    assert len(set(expressions)) == len(expressions)
    for problem in PROBLEMS:
        assert problem.answer == evaluate(problem.expression) >= 0
        for step, value in problem.steps:  # every worked step is itself right
            assert evaluate(step) == value
    assert {p.family for p in PROBLEMS} == {"add", "mul", "add3", "mul_add", "add_mul"}


def expected_test_count(fraction: float) -> int:
    families = {p.family for p in PROBLEMS}
    return sum(max(1, round(fraction * sum(p.family == f for p in PROBLEMS))) for f in families)


@given(st.integers(0, 2**32), st.floats(0.0, 0.5))
@settings(max_examples=40, deadline=None)
def test_split_is_disjoint_stratified_and_complete(seed, fraction):
    train, test = tiny.split_problems(PROBLEMS, fraction, random.Random(seed))
    assert len(train) + len(test) == len(PROBLEMS)
    assert not {p.expression for p in train} & {p.expression for p in test}
    assert len(test) == expected_test_count(fraction)
    for family in {p.family for p in PROBLEMS}:  # every family is in both sets
        assert any(p.family == family for p in test)
        assert any(p.family == family for p in train)


@given(st.sampled_from(PROBLEMS), st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_solutions_box_their_final_number(problem, seed):
    text, right = tiny.sample_solution(problem, random.Random(seed))
    boxed = extract_boxed(text)
    assert boxed is not None and text.endswith(f"\\boxed{{{boxed}}}")
    assert (int(boxed) == problem.answer) == right
    assert int(boxed) >= 0
    if "=" in text:  # worked: the last step's result is the boxed one; earlier steps are right
        results = [int(v) for v in re.findall(r"=(\d+)", text)]
        assert results[-1] == int(boxed)
        assert results[:-1] == [v for _, v in problem.steps[:len(results) - 1]]
        if len(results) < len(problem.steps):  # a skipped last step boxes the first result
            assert int(boxed) == problem.steps[0][1] and not right


def test_wrong_share_follows_the_rates():
    rng = random.Random(0)
    two_step = [p for p in PROBLEMS if len(p.steps) == 2]
    outcomes = []
    for _ in range(4000):
        problem = rng.choice(two_step)
        text, right = tiny.sample_solution(problem, rng)
        outcomes.append((problem, text, right))
    wrong = sum(not right for _, _, right in outcomes) / len(outcomes)
    slip = (tiny.WORKED_SHARE * tiny.SLIP_RATE["worked"]
            + (1 - tiny.WORKED_SHARE) * tiny.SLIP_RATE["direct"])
    assert abs(wrong - (tiny.SKIP_RATE + slip)) < 0.03
    # a skipped step boxes the first step's result
    skipped = sum(extract_boxed(text) == str(p.steps[0][1]) for p, text, _ in outcomes)
    assert abs(skipped / len(outcomes) - tiny.SKIP_RATE) < 0.03
    lengths = {len(text) for _, text, _ in outcomes}
    assert max(lengths) - min(lengths) >= 15  # direct answers and worked ones differ


def test_policy_figures_by_hand():
    # prompt 1: 2 of 3 right (mixed); prompt 2: none right, one unboxed; prompt 3: all right.
    outcomes = [[(True, True, 4), (False, True, 6), (True, True, 2)],
                [(False, True, 3), (False, False, 9), (False, True, 3)],
                [(True, True, 1), (True, True, 1), (True, True, 1)]]
    figures = tiny.policy_figures(["a", "b", "a"], outcomes)
    assert figures["accuracy"] == pytest.approx(5 / 9)
    assert figures["boxed_fraction"] == pytest.approx(8 / 9)
    assert figures["mixed_fraction"] == pytest.approx(1 / 3)
    assert figures["always_right_fraction"] == pytest.approx(1 / 3)
    assert figures["never_right_fraction"] == pytest.approx(1 / 3)
    assert figures["mean_response_tokens"] == pytest.approx(30 / 9)
    assert figures["by_family"]["a"]["accuracy"] == pytest.approx(5 / 6)
    assert figures["by_family"]["b"]["prompts"] == 1


def test_sft_batch_masks_everything_but_responses():
    from dcpo_cli.tiny.model import build_tokenizer

    tokenizer = build_tokenizer()
    ids, mask, labels = tiny.sft_batch(tokenizer, [([1, 2, 3], [7, 8]), ([4], [9])])
    pad = tokenizer.pad_token_id
    assert ids.tolist() == [[1, 2, 3, 7, 8], [4, 9, pad, pad, pad]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, -100, 7, 8], [-100, 9, -100, -100, -100]]


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    values = [tiny.lr_at(s, 100, 1.0) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:], strict=False))
    assert values[-1] == pytest.approx(0.1, abs=0.01)


# ------------------------------------------------------------------ the command


@pytest.mark.slow
def test_same_seed_gives_identical_bytes(built):
    first, second, _ = built
    hashes = sha256_tree(first)
    assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json",
            "train.parquet", "test.parquet", "summary.json"} <= set(hashes)
    assert hashes == sha256_tree(second)


@pytest.mark.slow
def test_other_seed_gives_other_weights_and_split(built, tmp_path):
    result = run_dcpo("tiny", "init", str(tmp_path / "c"), "--seed", "6", "--size", "test")
    assert result.code == 0, result.stderr
    first, _, _ = built
    for name in ("model/model.safetensors", "test.parquet"):
        assert (first / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


@pytest.mark.slow
def test_files_follow_the_prompts_contract(built):
    first, _, _ = built
    train = contracts.read_table(first / "train.parquet", "prompts").to_pylist()
    test = contracts.read_table(first / "test.parquet", "prompts").to_pylist()
    assert len(test) == expected_test_count(tiny.CONFIGS["test"].test_fraction)
    assert len(train) + len(test) == len(PROBLEMS)
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    for row in train + test:
        assert row["answer"] == str(evaluate(row["problem"]))
        assert row["prompt"] == [{"role": "user",
                                  "content": f"What is {row['problem']}? {tiny.INSTRUCTION}"}]
        assert row["prompt_id"] == f"tiny/{row['problem']}"
        assert row["source"].startswith("tiny-")
    metadata = contracts.read_metadata(first / "test.parquet")
    assert metadata["kind"] == "prompts" and metadata["stage"] == "tiny"
    assert metadata["options"] == {"seed": 5, "size": "test"}
    assert "time" not in json.dumps(metadata)  # no timestamps: bytes depend on the seed only


@pytest.mark.slow
def test_summary_fields_are_consistent(built):
    first, _, result = built
    summary = json.loads((first / "summary.json").read_text())
    policy = summary["initial_policy"]
    assert policy["samples_per_prompt"] == tiny.TINY_SUMMARY_SAMPLES
    assert policy["responses"] == summary["test_prompts"] * tiny.TINY_SUMMARY_SAMPLES
    assert policy["max_new_tokens"] == summary["loop"]["max_new_tokens"] == tiny.TINY_MAX_NEW_TOKENS
    for key in ("accuracy", "boxed_fraction", "mixed_fraction"):
        assert 0 <= policy[key] <= 1
    assert policy["accuracy"] <= policy["boxed_fraction"]  # a right answer is boxed
    assert (policy["mixed_fraction"] + policy["always_right_fraction"]
            + policy["never_right_fraction"]) == pytest.approx(1)
    families = policy["by_family"].values()
    assert sum(f["prompts"] for f in families) == summary["test_prompts"]
    assert sum(f["accuracy"] * f["responses"] for f in families) == pytest.approx(
        policy["accuracy"] * policy["responses"])
    assert summary["parameters"] > 0 and summary["train_prompts"] + summary["test_prompts"] == \
        len(PROBLEMS)
    assert f"{100 * policy['accuracy']:.1f}%" in result.stdout  # printed in the table


@pytest.mark.slow
def test_model_round_trips_and_generates_with_its_chat_template(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = built[0] / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "qwen2"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3? Answer in \\boxed{}."}],
        tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    batch = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**batch, do_sample=True, max_new_tokens=8,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new = out[0, batch["input_ids"].shape[1]:]
    assert 0 < len(new) <= 8
    assert isinstance(tokenizer.decode(new, skip_special_tokens=True), str)


def test_refuses_a_non_empty_directory_and_a_bad_size(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    result = run_dcpo("tiny", "init", str(tmp_path / "taken"), "--size", "test")
    assert_one_line_error(result, "taken", "not empty")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    result = run_dcpo("tiny", "init", str(tmp_path / "new"), "--size", "huge")
    assert_one_line_error(result, "--size", "huge")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ the prebuilt default

PREBUILT = Path(str(tiny.prebuilt_source()))


def test_default_init_copies_the_prebuilt_files(tmp_path):
    result = run_dcpo("tiny", "init", str(tmp_path / "t"))
    assert result.code == 0, result.stderr
    shipped = {name: digest for name, digest in sha256_tree(PREBUILT).items()
               if name.split("/")[0] in tiny.PREBUILT_FILES}
    assert sha256_tree(tmp_path / "t") == shipped  # all of it, and nothing else
    assert "prebuilt" in result.stdout
    summary = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert {"seed": summary["seed"], "size": summary["size"]} == tiny.PREBUILT_OPTIONS
    policy = summary["initial_policy"]
    assert f"{100 * policy['accuracy']:.1f}%" in result.stdout
    # the demo's premise: a policy that is right sometimes, with room to learn
    assert 0.1 < policy["accuracy"] < 0.6 and policy["mixed_fraction"] > 0.3


def test_the_prebuilt_task_is_the_seed_0_task():
    """What the prebuilt files hold is what this code makes for seed 0 (no training needed
    to check the data; the weights are checked by the slow rebuild test)."""
    config = tiny.CONFIGS["default"]
    train, test = tiny.split_problems(tiny.all_problems(), config.test_fraction,
                                      random.Random("split-0"))
    for name, problems in (("train", train), ("test", test)):
        table = contracts.read_table(PREBUILT / f"{name}.parquet", "prompts")
        assert table.to_pylist() == tiny.prompt_rows(problems)
        assert contracts.read_metadata(PREBUILT / f"{name}.parquet")["options"] == \
            tiny.PREBUILT_OPTIONS
    summary = json.loads((PREBUILT / "summary.json").read_text())
    assert summary["loop"] == tiny.TINY_LOOP
    assert summary["sft"]["steps"] == config.sft_steps


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_rebuild_reproduces_the_prebuilt_files(tmp_path):
    """`--rebuild` trains from scratch and gets the shipped files again.

    What is guaranteed everywhere is compared exactly: the prompts (tables and dcpo metadata),
    the tokenizer and the model config. The weights come out of 700 AdamW steps of float32
    CPU kernels whose summation order depends on the torch build, the CPU's vector unit and
    the thread count, so they are bit-exact only where those match the build recorded in
    BUILD.json (as in CI, which runs the build it was made with); elsewhere the rebuilt
    policy must be as good, within sampling noise, as the shipped one."""
    import pyarrow.parquet as pq
    import torch

    build = json.loads((PREBUILT / "BUILD.json").read_text())
    # the build's thread count (`make test` gives its processes one); a bound for a busy
    # machine, not a measurement
    result = run_dcpo("tiny", "init", str(tmp_path / "r"), "--rebuild", timeout=1800,
                      env={"OMP_NUM_THREADS": str(build["threads"])})
    assert result.code == 0, result.stderr
    assert "prebuilt" not in result.stdout
    rebuilt = tmp_path / "r"
    assert set(sha256_tree(rebuilt)) == {name for name in sha256_tree(PREBUILT)
                                         if name.split("/")[0] in tiny.PREBUILT_FILES}
    for name in ("train.parquet", "test.parquet"):
        assert pq.read_table(rebuilt / name).equals(pq.read_table(PREBUILT / name))
        assert contracts.read_metadata(rebuilt / name) == contracts.read_metadata(PREBUILT / name)
    for name in ("model/config.json", "model/tokenizer.json", "model/tokenizer_config.json",
                 "model/generation_config.json"):
        mine, shipped = (json.loads((d / name).read_text()) for d in (rebuilt, PREBUILT))
        mine.pop("transformers_version", None)
        shipped.pop("transformers_version", None)
        assert mine == shipped, name

    weights, shipped_weights = tensors(rebuilt / "model/model.safetensors"), \
        tensors(PREBUILT / "model/model.safetensors")
    assert {k: v.shape for k, v in weights.items()} == \
        {k: v.shape for k, v in shipped_weights.items()}
    mine, shipped = (json.loads((d / "summary.json").read_text()) for d in (rebuilt, PREBUILT))
    if {**tiny.build_environment(), "threads": build["threads"]} == build:  # the rebuild's
        assert all(torch.equal(weights[k], shipped_weights[k]) for k in weights)
        assert mine == shipped
    else:
        assert mine["parameters"] == shipped["parameters"]
        assert abs(mine["sft"]["final_loss"] - shipped["sft"]["final_loss"]) < 0.05
        assert abs(mine["initial_policy"]["accuracy"]
                   - shipped["initial_policy"]["accuracy"]) < 0.08
