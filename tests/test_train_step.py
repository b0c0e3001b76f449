"""`dcpo train-step` on the tiny model: the update, its files, resuming, and refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from builders import write_scored
from conftest import assert_one_line_error, run_dcpo

from dcpo_cli.errors import DcpoError
from dcpo_cli.files import contracts
from dcpo_cli.train.step import TrainOptions, run_train_step

METRIC_KEYS = {"clip_ratio", "clip_ratio_low", "clip_ratio_high", "nonzero_advantage_ratio",
               "reward_mean", "response_length_mean", "truncated_ratio", "approx_kl", "entropy",
               "grad_norm", "lr", "tokens_per_second", "seconds"}

# Rewards per prompt for step 0 (mixed groups) and step 1 (two groups all equal).
REWARDS_0 = {"p0": [1, 0, 0, 1], "p1": [0, 0, 0, 1], "p2": [1, 1, 0, 1], "p3": [0, 1, 0, 0]}
REWARDS_1 = {"p0": [1, 1, 1, 1], "p1": [0, 0, 0, 0], "p2": [1, 0, 1, 1], "p3": [0, 1, 1, 0]}


def hand_sas(rewards: list[float], stats: dict | None) -> tuple[list[float], dict]:
    """docs/design.md 1.2, written out independently of dcpo_cli.core.algorithms."""
    n = len(rewards)
    mean_new = sum(rewards) / n
    std_new = math.sqrt(sum((r - mean_new) ** 2 for r in rewards) / (n - 1))
    times = stats["times"] if stats else 0
    t = times + 1
    if times == 0:
        mean_tot, std_tot = mean_new, std_new
    else:
        mean, std = stats["mean"], stats["std"]
        mean_tot = (mean * times + mean_new) / t
        std_tot = math.sqrt((times * std ** 2 + std_new ** 2
                             + times / t * (mean_new - mean) ** 2) / t)
    out = []
    for r in rewards:
        a_new = (r - mean_new) / std_new if std_new > 0 else 0.0
        a_tot = (r - mean_tot) / std_tot if std_tot > 0 else 0.0
        sa_new = (t - 1) / t * a_new + a_tot / t
        sa_tot = a_new / t + (t - 1) / t * a_tot
        out.append(sa_new if abs(sa_new) < abs(sa_tot) else sa_tot)
    return out, {"times": t, "mean": mean_tot, "std": std_tot}


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def records(ckpt: Path) -> dict[tuple[str, int], dict]:
    table = contracts.read_table(ckpt / "train_records.parquet", "train_records").to_pylist()
    return {(r["prompt_id"], r["sample_index"]): r for r in table}


FAST = ["--lr", "1e-3", "--warmup-steps", "10", "--micro-batch-tokens", "256"]


@pytest.fixture(scope="module")
def first_step(tmp_path_factory, random_model_dir, tokenizer):
    """One DCPO step through the CLI; later tests reuse its files."""
    root = tmp_path_factory.mktemp("train")
    scored = write_scored(root / "scored-0.parquet", tokenizer, 0, REWARDS_0)
    state, ckpt = root / "state.json", root / "ckpt-1"
    log = root / "metrics.jsonl"
    result = run_dcpo("train-step", "--model", random_model_dir, "--scored", scored,
                      "--state", state, "--out", ckpt, "--metrics-log", log, *FAST)
    assert result.code == 0, result.stderr
    return root, scored, state, ckpt, log, result


@pytest.mark.slow
def test_one_dcpo_step_trains_and_records_sas(first_step, random_model_dir):
    root, scored, state, ckpt, log, result = first_step
    before, after = load_weights(random_model_dir), load_weights(ckpt)
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    recs = records(ckpt)
    for prompt_id, rewards in REWARDS_0.items():
        want, _ = hand_sas([float(r) for r in rewards], None)
        got = [recs[(prompt_id, i)]["advantage"] for i in range(len(rewards))]
        assert got == pytest.approx(want, abs=1e-9)
        for i, rec in enumerate(recs[(prompt_id, i)] for i in range(len(rewards))):
            assert rec["step"] == 0 and rec["reward"] == rewards[i]
            assert rec["response_tokens"] >= 2 and rec["clipped_tokens"] >= 0
            assert rec["old_logprob_mean"] < 0 and rec["new_logprob_mean"] < 0

    saved = json.loads(state.read_text())
    assert saved["last_step"] == 0
    assert {p: s["times"] for p, s in saved["prompts"].items()} == dict.fromkeys(REWARDS_0, 1)
    assert state.read_bytes() == (ckpt / "sas_state.json").read_bytes()

    metrics = json.loads((ckpt / "metrics.json").read_text())
    assert metrics.keys() >= METRIC_KEYS
    assert metrics["nonzero_advantage_ratio"] == 1.0  # every step-0 group is mixed
    rewards_0 = [r for group in REWARDS_0.values() for r in group]
    assert metrics["accuracy"] == sum(rewards_0) / len(rewards_0)  # `correct` is reward > 0
    assert metrics["truncated_ratio"] == 0.25
    assert metrics["lr"] == pytest.approx(1e-4)  # warm-up: step 1 of 10
    assert metrics["updates"] == 4  # 4 prompts, default mini-batch = a quarter
    assert json.loads(log.read_text().splitlines()[0])["step"] == 0
    trainer = json.loads((ckpt / "trainer_state.json").read_text())
    assert trainer["global_step"] == 1 and trainer["optimizer_updates"] == 4
    assert trainer["rollout_step"] == 0
    for name in ("training_state/.metadata", "training_state/rng_state.pt", "config.json",
                 "generation_config.json", "tokenizer.json"):
        assert (ckpt / name).is_file(), name
    assert "clip_ratio" in result.stdout  # the metrics table


def test_checkpoint_loads_and_generates(first_step):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = first_step[3]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    ids = tok("1+1=", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5 or out[0, -1] == tok.eos_token_id


@pytest.mark.slow
def test_rerun_is_done_and_absorbing_twice_is_refused(first_step, random_model_dir):
    root, scored, state, ckpt, log, _ = first_step
    again = run_dcpo("train-step", "--model", random_model_dir, "--scored", scored, "--state",
                     state, "--out", ckpt, "--metrics-log", log, *FAST)
    assert again.code == 0, again.stderr
    assert "already done" in again.stderr
    assert len(log.read_text().splitlines()) == 1  # not logged twice
    twice = run_dcpo("train-step", "--model", random_model_dir, "--scored", scored, "--state",
                     state, "--out", root / "other", *FAST)
    assert_one_line_error(twice, "already absorbed step 0")
    assert not (root / "other").exists()


def test_crash_between_checkpoint_and_state_is_synced(first_step, random_model_dir, tmp_path):
    """CKPT is the commit point: a rerun after a crash before STATE was written completes
    the state update from the snapshot, and the result is the uninterrupted run's."""
    root, scored, state, ckpt, _, _ = first_step
    ckpt_copy, state_copy = tmp_path / "ckpt-1", tmp_path / "state.json"
    shutil.copytree(ckpt, ckpt_copy)  # a checkpoint whose state update never happened
    options = TrainOptions(lr=1e-3, micro_batch_tokens=256)
    outcome = run_train_step(random_model_dir, [scored], state_copy, ckpt_copy, options,
                             show_progress=False)
    assert outcome.status == "synced"
    assert state_copy.read_bytes() == state.read_bytes()
    assert run_train_step(random_model_dir, [scored], state_copy, ckpt_copy, options,
                          show_progress=False).status == "done"


@pytest.mark.slow
def test_crash_before_checkpoint_reruns_to_identical_files(first_step, random_model_dir,
                                                           tmp_path, monkeypatch):
    root, scored, state, ckpt, _, _ = first_step
    import dcpo_cli.train.step as ts

    options = TrainOptions(lr=1e-3, micro_batch_tokens=256)
    real = ts.save_checkpoint

    def dies_half_way(out, model, tokenizer, optimizer, trainer_state, write_extra=None):
        def extra(tmp):
            write_extra(tmp)
            raise KeyboardInterrupt  # killed while the checkpoint is being written
        real(out, model, tokenizer, optimizer, trainer_state, extra)

    monkeypatch.setattr(ts, "save_checkpoint", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        run_train_step(random_model_dir, [scored], tmp_path / "state.json", tmp_path / "ckpt",
                       options, show_progress=False)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "state.json").exists()
    monkeypatch.setattr(ts, "save_checkpoint", real)
    run_train_step(random_model_dir, [scored], tmp_path / "state.json", tmp_path / "ckpt",
                   options, show_progress=False)
    assert (tmp_path / "state.json").read_bytes() == state.read_bytes()
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == \
        (ckpt / "model.safetensors").read_bytes()


def test_second_step_continues_and_dcpo_uses_more_responses_than_grpo(first_step, tokenizer):
    root, _, state, ckpt, _, _ = first_step
    scored = write_scored(root / "scored-1.parquet", tokenizer, 1, REWARDS_1)
    ratios, advantages = {}, {}
    for algo in ("dcpo", "grpo"):
        state_copy = root / f"state-{algo}.json"
        shutil.copy(state, state_copy)
        out = root / f"ckpt-2-{algo}"
        outcome = run_train_step(ckpt, [scored], state_copy, out,
                                 # two branches from ckpt-1 beside it: keep its state
                                 TrainOptions(algo=algo, lr=1e-3, micro_batch_tokens=256,
                                              keep_training_state=3),
                                 show_progress=False)
        trainer = json.loads((out / "trainer_state.json").read_text())
        assert trainer["global_step"] == 2 and trainer["optimizer_updates"] == 8
        assert outcome.metrics["lr"] == pytest.approx(2e-4)  # warm-up continues
        ratios[algo] = outcome.metrics["nonzero_advantage_ratio"]
        advantages[algo] = records(out)
        saved = json.loads(state_copy.read_text())
        assert {p: s["times"] for p, s in saved["prompts"].items()} == dict.fromkeys(REWARDS_1, 2)
    assert ratios["grpo"] == 0.5  # two of four groups are uniform
    assert ratios["dcpo"] > ratios["grpo"]
    previous = json.loads(state.read_text())["prompts"]
    for prompt_id, rewards in REWARDS_1.items():
        want, _ = hand_sas([float(r) for r in rewards], previous[prompt_id])
        got = [advantages["dcpo"][(prompt_id, i)]["advantage"] for i in range(len(rewards))]
        assert got == pytest.approx(want, abs=1e-9)


@pytest.mark.slow
def test_rerunning_an_earlier_step_after_later_ones_is_done(first_step, tokenizer, tmp_path):
    """A shell loop re-run after a kill replays every train-step; the finished ones must not
    touch a state that later steps have already moved on."""
    root, scored_0, state, ckpt, _, _ = first_step
    state_copy = tmp_path / "state.json"
    shutil.copy(state, state_copy)
    options = TrainOptions(lr=1e-3, micro_batch_tokens=256)
    scored_1 = write_scored(tmp_path / "scored-1.parquet", tokenizer, 1, REWARDS_1)
    run_train_step(ckpt, [scored_1], state_copy, tmp_path / "ckpt-2", options,
                   show_progress=False)
    after_step_1 = state_copy.read_bytes()
    outcome = run_train_step(ckpt.parent / "unused-model", [scored_0], state_copy, ckpt,
                             options, show_progress=False)
    assert outcome.status == "done"
    assert state_copy.read_bytes() == after_step_1


def test_a_moved_run_still_resumes(first_step, random_model_dir, tmp_path):
    root, scored, state, ckpt, _, _ = first_step
    moved = tmp_path / "moved"
    for path in (scored, state):
        (moved / path.name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, moved / path.name)
    shutil.copytree(ckpt, moved / ckpt.name)
    outcome = run_train_step(random_model_dir, [moved / scored.name], moved / state.name,
                             moved / ckpt.name, TrainOptions(lr=1e-3), show_progress=False)
    assert outcome.status == "done"


@pytest.mark.slow
def test_continuing_from_a_checkpoint_needs_the_state_it_left(first_step, tokenizer,
                                                                tmp_path):
    """ckpt-1 was trained from an absent state. Continuing from it with an absent state is
    the loop after a kill between checkpoint and state: the state update is finished first.
    A state from elsewhere is refused instead of silently skipping a step's statistics."""
    from dcpo_cli.core.algorithms import PromptStats
    from dcpo_cli.files.sas_state import SasState

    root, _, state, ckpt, _, _ = first_step
    scored_1 = write_scored(tmp_path / "scored-1.parquet", tokenizer, 1, REWARDS_1)
    options = TrainOptions(lr=1e-3, micro_batch_tokens=256)
    synced = tmp_path / "state.json"
    run_train_step(ckpt, [scored_1], synced, tmp_path / "ckpt-2", options,
                   show_progress=False)
    saved = json.loads(synced.read_text())
    assert saved["last_step"] == 1
    assert {p: s["times"] for p, s in saved["prompts"].items()} == dict.fromkeys(REWARDS_1, 2)

    foreign = tmp_path / "foreign.json"
    SasState({"p0": PromptStats(1, 0.5, 0.5)}, 0).save(foreign)
    result = run_dcpo("train-step", "--model", ckpt, "--scored", scored_1, "--state", foreign,
                      "--out", tmp_path / "ckpt-x", *FAST)
    assert_one_line_error(result, "foreign.json", f"is not the SAS state {ckpt.name} left")
    assert not (tmp_path / "ckpt-x").exists()


def test_resumed_optimizer_takes_the_new_weight_decay(first_step, tokenizer, tmp_path):
    root, _, state, ckpt, _, _ = first_step
    shutil.copy(state, tmp_path / "state.json")
    scored_1 = write_scored(tmp_path / "scored-1.parquet", tokenizer, 1, REWARDS_1)
    run_train_step(ckpt, [scored_1], tmp_path / "state.json", tmp_path / "ckpt-2",
                   TrainOptions(lr=1e-3, weight_decay=0.0), show_progress=False)
    assert saved_weight_decays(tmp_path / "ckpt-2") == {0.0}
    assert saved_weight_decays(ckpt) == {0.1}


def saved_weight_decays(ckpt: Path) -> set[float]:
    """The optimizer's param-group weight decays as stored in the DCP training state."""
    import warnings

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    metadata = FileSystemReader(str(ckpt / "training_state")).read_metadata()
    keys = {k for k in metadata.state_dict_metadata if k.endswith(".weight_decay")}
    assert keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = _load_state_dict_from_keys(keys=keys, checkpoint_id=ckpt / "training_state")
    return {group["weight_decay"] for group in loaded["optimizer"]["param_groups"]}


def test_a_non_finite_gradient_writes_nothing(first_step, random_model_dir, tmp_path,
                                              monkeypatch):
    root, scored, _, _, _, _ = first_step
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: torch.tensor(float("nan")))
    with pytest.raises(DcpoError, match="gradient of update 1 is not finite"):
        run_train_step(random_model_dir, [scored], tmp_path / "state.json", tmp_path / "ckpt",
                       TrainOptions(lr=1e-3), show_progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="an fp32 equivalence; GPUs train in bf16")
@pytest.mark.slow
def test_update_does_not_depend_on_micro_batch_split(random_model_dir, tokenizer, tmp_path):
    scored = write_scored(tmp_path / "scored.parquet", tokenizer, 0, REWARDS_0, max_len=30)
    weights = []
    for budget in (64, 4096):
        out = tmp_path / f"ckpt-{budget}"
        run_train_step(random_model_dir, [scored], tmp_path / f"state-{budget}.json", out,
                       TrainOptions(lr=1e-3, warmup_steps=0, micro_batch_tokens=budget,
                                    mini_batch_size=2, epochs=2), show_progress=False)
        weights.append(load_weights(out))
    changed = 0
    for name, tensor in weights[0].items():
        # fp32 summation order differs between splits; AdamW divides each gradient entry by
        # its own RMS, so near-zero entries carry that noise into steps of up to lr (1e-3):
        # 1.1e-5 seen under OTM. A wrong split (a per-micro-batch normalizer) moves whole
        # tensors by ~lr.
        torch.testing.assert_close(tensor, weights[1][name], atol=5e-5, rtol=0)
        changed += int(not torch.equal(tensor, load_weights(random_model_dir)[name]))
    assert changed > 0


def test_dr_grpo_normalizes_by_the_rollouts_generation_limit(random_model_dir, tokenizer,
                                                             tmp_path):
    options = TrainOptions(algo="grpo", overrides={"loss_agg": "seq-mean-token-sum-norm"},
                           lr=1e-3)
    unknown = write_scored(tmp_path / "unknown.parquet", tokenizer, 0, REWARDS_0)
    with pytest.raises(DcpoError, match="unknown.parquet.*needs the rollouts' max_new_tokens"):
        run_train_step(random_model_dir, [unknown], tmp_path / "s.json", tmp_path / "c",
                       options, show_progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "s.json").exists()
    losses = {}
    for limit in (16, 32):
        scored = write_scored(tmp_path / f"limit-{limit}.parquet", tokenizer, 0, REWARDS_0,
                              max_new_tokens=limit)
        outcome = run_train_step(random_model_dir, [scored], tmp_path / f"s{limit}.json",
                                 tmp_path / f"c{limit}", options, show_progress=False)
        losses[limit] = outcome.metrics["loss"]
    # Same responses, same first update: the loss halves with twice the constant. (Adam
    # makes later updates nearly scale-free, hence the tolerance.)
    assert losses[32] == pytest.approx(losses[16] / 2, rel=0.05)


def test_the_policy_is_built_without_dropout(random_model_dir, tmp_path):
    """Old log-probs must be reproducible by the training forward (same weights, same
    numbers), so a model configured with dropout trains with it off."""
    from dcpo_cli.policy.build import build_policy

    model_dir = tmp_path / "model"
    shutil.copytree(random_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (model_dir / "config.json").write_text(json.dumps(config))
    model, _ = build_policy(model_dir, torch.device("cpu"))
    model.train()
    ids = torch.arange(5, 45).reshape(2, 20)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_bad_inputs_are_one_line_errors(random_model_dir, tokenizer, tmp_path):
    vocab = len(tokenizer)
    bad_vocab = write_scored(tmp_path / "big-ids.parquet", tokenizer, 0, {"p0": [1, 0]},
                             vocab=vocab + 50, max_len=40, seed=3)
    result = run_dcpo("train-step", "--model", random_model_dir, "--scored", bad_vocab,
                      "--state", tmp_path / "s.json", "--out", tmp_path / "c")
    assert_one_line_error(result, "big-ids.parquet", "vocabulary")
    assert not (tmp_path / "c").exists() and not (tmp_path / "s.json").exists()
    result = run_dcpo("train-step", "--model", random_model_dir, "--scored", bad_vocab,
                      "--state", tmp_path / "s.json", "--out", tmp_path / "c",
                      "--mini-batch-size", "0")
    assert_one_line_error(result, "--mini-batch-size must be at least 1")

    options = TrainOptions()
    single = write_scored(tmp_path / "single.parquet", tokenizer, 0, {"p0": [1], "p1": [0, 1]})
    with pytest.raises(DcpoError, match="single.parquet.*single response"):
        run_train_step(random_model_dir, [single], tmp_path / "s.json", tmp_path / "c", options)
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(DcpoError, match="empty.parquet.*empty"):
        run_train_step(random_model_dir, [empty], tmp_path / "s.json", tmp_path / "c", options)
    good = write_scored(tmp_path / "good.parquet", tokenizer, 0, {"p0": [1, 0]})
    with pytest.raises(DcpoError, match="not a model directory"):
        run_train_step(tmp_path, [good], tmp_path / "s.json", tmp_path / "c", options)
    other_step = write_scored(tmp_path / "step3.parquet", tokenizer, 3, {"p9": [1, 0]})
    with pytest.raises(DcpoError, match="different steps"):
        run_train_step(random_model_dir, [good, other_step], tmp_path / "s.json",
                       tmp_path / "c", options)
    assert not (tmp_path / "c").exists() and not (tmp_path / "s.json").exists()
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{half a state")
    with pytest.raises(DcpoError, match="corrupt.json: not a readable SAS state"):
        run_train_step(random_model_dir, [good], corrupt, tmp_path / "c", options)
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------- DAPO refill (rounds, target)


@pytest.mark.slow
def test_dapo_target_trains_the_first_kept_groups_in_round_order(random_model_dir, tokenizer,
                                                                  tmp_path):
    """Two rollout rounds of one step; --target-prompts 3 trains the first three groups with
    mixed outcomes (round 0 first, then round 1, each in prompt order). The filter reads the
    `correct` column: r0b's rewards differ (0.5 vs 0.9, shaped) but all are correct."""
    round0 = write_scored(tmp_path / "r0.parquet", tokenizer, 0,
                          {"r0a": [1, 0, 1, 0], "r0b": [0.5, 0.9, 0.5, 0.5],
                           "r0c": [0, 0, 1, 0]})
    round1 = write_scored(tmp_path / "r1.parquet", tokenizer, 0,
                          {"r1a": [0, 0, 0, 0], "r1b": [1, 0, 0, 0], "r1c": [0, 1, 1, 1]},
                          seed=5, round_index=1)
    state, ckpt = tmp_path / "state.json", tmp_path / "ckpt"
    # shards given in any order: the rounds come from the metadata
    outcome = run_train_step(random_model_dir, [round1, round0], state, ckpt,
                             TrainOptions(algo="dapo", lr=1e-3, target_prompts=3),
                             show_progress=False)
    metrics = outcome.metrics
    assert (metrics["groups_generated"], metrics["groups_kept"], metrics["groups_trained"]) \
        == (6, 4, 3)
    assert metrics["dropped_groups"] == 2  # r0b (all correct), r1a (all wrong)
    trained = {pid for pid, _ in records(ckpt)}
    assert trained == {"r0a", "r0b", "r0c", "r1a", "r1b"}  # r1c: after the target, left out
    assert set(json.loads(state.read_text())["prompts"]) == trained  # r1c is not absorbed
    # no target: every kept group of every round is trained
    outcome = run_train_step(random_model_dir, [round0, round1], tmp_path / "s2.json",
                             tmp_path / "ckpt-2", TrainOptions(algo="dapo", lr=1e-3),
                             show_progress=False)
    assert (outcome.metrics["groups_kept"], outcome.metrics["groups_trained"]) == (4, 4)
    # a target beyond the kept groups trains on all of them
    outcome = run_train_step(random_model_dir, [round0, round1], tmp_path / "s3.json",
                             tmp_path / "ckpt-3",
                             TrainOptions(algo="dapo", lr=1e-3, target_prompts=9),
                             show_progress=False)
    assert outcome.metrics["groups_trained"] == 4
