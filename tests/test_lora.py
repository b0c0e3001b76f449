"""LoRA through peft (`--lora-rank`): the zero-B equivalence, the adapter checkpoint and the
stages that read it (rollout, another train-step, export), the KL reference with the
adapter disabled, FSDP2, resuming, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import write_scored
from conftest import assert_one_line_error, run_dcpo
from loop_runs import RUN_FLAGS, assert_same_run, dcpo_run, finish, shell_loop, with_tiny_of

from dcpo_cli.files import contracts
from dcpo_cli.train.step import TrainOptions, run_train_step

REWARDS_0 = {"p0": [1, 0, 0, 1], "p1": [0, 0, 0, 1], "p2": [1, 1, 0, 1], "p3": [0, 1, 0, 0]}
REWARDS_1 = {"p0": [1, 1, 0, 1], "p1": [0, 1, 0, 0], "p2": [1, 0, 1, 1], "p3": [0, 1, 1, 0]}
FAST = ["--lr", "1e-2", "--warmup-steps", "0", "--micro-batch-tokens", "256"]
LORA = ["--lora-rank", "4"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("lora-scored")
    return [write_scored(root / f"scored-{i}.parquet", tokenizer, i, rewards)
            for i, rewards in enumerate((REWARDS_0, REWARDS_1))]


@pytest.fixture(scope="module")
def lora_step(tmp_path_factory, random_model_dir, scored):
    """One LoRA step through the CLI, with the KL on (grpo's 0.001 to the base)."""
    root = tmp_path_factory.mktemp("lora")
    result = run_dcpo("train-step", "--model", random_model_dir, "--scored", scored[0],
                      "--state", root / "state.json", "--out", root / "ckpt-1", "--algo",
                      "grpo", "--metrics-log", root / "metrics.jsonl", *FAST, *LORA)
    assert result.code == 0, result.stderr
    return root, root / "ckpt-1"


def adapter_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(ckpt / "adapter_model.safetensors")


def batch_of(tokenizer, seed: int = 0):
    """A micro-batch of three random responses after a short prompt."""
    from dcpo_cli.core.batching import collate

    gen = torch.Generator().manual_seed(seed)
    prompts = [tokenizer("What is 1+2?", add_special_tokens=False)["input_ids"]] * 3
    responses = [torch.randint(5, len(tokenizer), (n,), generator=gen).tolist()
                 for n in (3, 7, 5)]
    return collate([0, 1, 2], prompts, responses, tokenizer.pad_token_id)


def logprobs(model, batch) -> torch.Tensor:
    from dcpo_cli.core.logprobs import logprobs_of

    with torch.no_grad():
        return logprobs_of(model, batch, 1 << 20)[0]


def hand_count(config: dict, rank: int) -> int:
    """LoRA parameters of every linear layer but the lm-head: rank x (in + out) each."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    head = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    shapes = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inner),
              (hidden, inner), (inner, hidden)]
    return config["num_hidden_layers"] * sum(rank * (i + o) for i, o in shapes)


def test_zero_b_adapter_gives_the_base_logprobs_exactly(random_model_dir, tokenizer):
    from dcpo_cli.policy import lora
    from dcpo_cli.policy.build import build_policy

    base, _ = build_policy(random_model_dir, torch.device("cpu"))
    wrapped, _ = build_policy(random_model_dir, torch.device("cpu"))
    torch.manual_seed(0)
    wrapped = lora.wrap(wrapped, 4, 32.0, 0.05, "all-linear", base_name="base",
                        base_revision=None)
    named = dict(wrapped.named_parameters())
    assert all(not p.any() for n, p in named.items() if "lora_B" in n)
    assert all(p.any() for n, p in named.items() if "lora_A" in n)  # only B is zero
    assert {n for n, p in named.items() if p.requires_grad} == \
        {n for n in named if "lora_" in n}
    batch = batch_of(tokenizer)
    with lora.dropout_off(wrapped):
        assert torch.equal(logprobs(wrapped, batch), logprobs(base, batch))
    with lora.adapter_disabled(wrapped):
        assert torch.equal(logprobs(wrapped, batch), logprobs(base, batch))
    assert all(p.requires_grad for n, p in wrapped.named_parameters() if "lora_" in n)


def test_lora_step_zero_measures_the_full_models_log_probs(random_model_dir, scored, tmp_path):
    """At step 0 the LoRA policy is the base model: its old log-probs (its own pass, LoRA
    dropout off) are bit-identical to full fine-tuning's, and the KL to the base is 0."""
    outcomes = {}
    for name, rank in (("full", None), ("lora", 4)):
        options = TrainOptions(lr=1e-2, warmup_steps=0, micro_batch_tokens=256, algo="grpo",
                               lora_rank=rank)
        outcomes[name] = run_train_step(random_model_dir, [scored[0]], tmp_path / f"{name}.json",
                                        tmp_path / name, options, show_progress=False)
    records = {name: contracts.read_table(tmp_path / name / "train_records.parquet",
                                          "train_records").to_pylist() for name in outcomes}
    assert [r["old_logprob_mean"] for r in records["lora"]] == \
        [r["old_logprob_mean"] for r in records["full"]]
    full, low = outcomes["full"].metrics, outcomes["lora"].metrics
    assert low["entropy"] == full["entropy"]
    assert low["kl_ref"] == 0.0 == full["kl_ref"]
    assert full["trainable_parameters"] == full["parameters"]
    assert low["trainable_parameters"] < full["trainable_parameters"] / 5
    # AdamW: two fp32 moments per trained element
    assert low["optimizer_state_bytes"] == 8 * low["trainable_parameters"]
    assert full["optimizer_state_bytes"] > 5 * low["optimizer_state_bytes"]


@pytest.mark.slow
def test_the_checkpoint_is_a_peft_adapter_naming_its_base(lora_step, random_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, ckpt = lora_step
    assert (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists() and not (ckpt / "config.json").exists()
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(random_model_dir.resolve())
    assert config["revision"] is None and config["r"] == 4 and config["lora_alpha"] == 32
    assert config["lora_dropout"] == 0.05
    # peft writes all-linear out as the modules it adapted
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} == \
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainer = json.loads((ckpt / "trainer_state.json").read_text())
    assert trainer["base_model"] == str(random_model_dir.resolve())
    assert trainer["ref_model"] == str(random_model_dir.resolve())  # the base, adapter off
    metrics = json.loads((ckpt / "metrics.json").read_text())
    model_config = json.loads((random_model_dir / "config.json").read_text())
    assert metrics["trainable_parameters"] == hand_count(model_config, 4)
    assert metrics["lora_rank"] == 4 and metrics["kl_ref"] == 0.0
    logged = json.loads((root / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["trainable_parameters"] == metrics["trainable_parameters"]
    assert logged["optimizer_state_bytes"] == metrics["optimizer_state_bytes"] > 0
    # the training state holds the adapter and its moments, not the frozen base
    assert sum(p.stat().st_size for p in (ckpt / "training_state").glob("*.distcp")) < \
        sum(p.stat().st_size for p in random_model_dir.glob("*.safetensors"))

    base = AutoModelForCausalLM.from_pretrained(random_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(random_model_dir),
                                      ckpt)
    saved = adapter_weights(ckpt)
    assert any(v.any() for k, v in saved.items() if "lora_B" in k)  # trained
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits, atol=1e-4)


@pytest.mark.slow
def test_rollout_from_the_lora_checkpoint_samples_base_plus_adapter(lora_step, scored, tiny,
                                                                    random_model_dir, tmp_path):
    """`dcpo rollout --model CKPT` generates with the adapter: its log-probs are those of
    PeftModel.from_pretrained(base, CKPT), not the base's; a second LoRA step continues."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, ckpt = lora_step
    rollouts = tmp_path / "rollouts.parquet"
    result = run_dcpo("rollout", "--model", ckpt, "--prompts", tiny / "train.parquet",
                      "--step", "0", "--batch-size", "2", "--n", "2", "--max-new-tokens", "6",
                      "--engine", "hf", "--out", rollouts)
    assert result.code == 0, result.stderr
    rows = contracts.read_table(rollouts, "rollouts").to_pylist()
    models = {"lora": PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(random_model_dir), ckpt),
        "base": AutoModelForCausalLM.from_pretrained(random_model_dir)}
    worst = {}
    for name, model in models.items():
        gaps = []
        for row in rows:
            ids = torch.tensor([row["prompt_token_ids"] + row["response_token_ids"]])
            with torch.no_grad():
                logits = model(ids).logits[0, len(row["prompt_token_ids"]) - 1:-1]
            mine = torch.log_softmax(logits, -1).gather(
                1, torch.tensor(row["response_token_ids"])[:, None]).squeeze(1)
            gaps.append(float((mine - torch.tensor(row["response_logprobs"])).abs().max()))
        worst[name] = max(gaps)
    assert worst["lora"] < 1e-4 < worst["base"]

    state = tmp_path / "state.json"
    shutil.copy(root / "state.json", state)
    result = run_dcpo("train-step", "--model", ckpt, "--scored", scored[1], "--state", state,
                      "--out", tmp_path / "ckpt-2", "--algo", "grpo", *FAST, *LORA)
    assert result.code == 0, result.stderr
    trainer = json.loads((tmp_path / "ckpt-2" / "trainer_state.json").read_text())
    assert trainer["global_step"] == 2 and trainer["optimizer_updates"] == 8
    assert trainer["base_model"] == str(random_model_dir.resolve())
    metrics = json.loads((tmp_path / "ckpt-2" / "metrics.json").read_text())
    assert metrics["kl_ref"] > 0  # the policy has moved away from the base
    before, after = adapter_weights(ckpt), adapter_weights(tmp_path / "ckpt-2")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_export_writes_the_merged_model(lora_step, random_model_dir, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, ckpt = lora_step
    out = tmp_path / "merged"
    result = run_dcpo("export", ckpt, "--out", out)
    assert result.code == 0, result.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    assert not (out / "training_state").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)  # no peft involved
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(random_model_dir),
                                        ckpt).get_base_model()
    batch = batch_of(tokenizer, seed=1)
    torch.testing.assert_close(logprobs(merged, batch), logprobs(adapted, batch), atol=1e-5,
                               rtol=0)
    base = AutoModelForCausalLM.from_pretrained(random_model_dir)
    assert not torch.allclose(logprobs(base, batch), logprobs(merged, batch), atol=1e-4)
    assert merged.num_parameters() == base.num_parameters()
    again = run_dcpo("export", ckpt, "--out", out)
    assert_one_line_error(again, "exists already")
    missing = run_dcpo("export", tmp_path / "nothing", "--out", tmp_path / "x")
    assert_one_line_error(missing, "nothing")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_crash_while_saving_reruns_to_identical_files(random_model_dir, scored, tmp_path,
                                                        monkeypatch):
    """Killed while the LoRA checkpoint is written: nothing is left, and the re-run writes
    the same adapter, training state and SAS state as an uninterrupted step."""
    import dcpo_cli.train.step as ts

    options = TrainOptions(lr=1e-2, warmup_steps=0, micro_batch_tokens=256, lora_rank=4)
    run_train_step(random_model_dir, [scored[0]], tmp_path / "ref.json", tmp_path / "ref",
                   options, show_progress=False)
    real = ts.save_checkpoint

    def dies_half_way(out, model, tokenizer, optimizer, trainer_state, write_extra=None):
        def extra(tmp):
            write_extra(tmp)
            raise KeyboardInterrupt
        real(out, model, tokenizer, optimizer, trainer_state, extra)

    monkeypatch.setattr(ts, "save_checkpoint", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        run_train_step(random_model_dir, [scored[0]], tmp_path / "state.json",
                       tmp_path / "ckpt", options, show_progress=False)
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "state.json").exists()
    monkeypatch.setattr(ts, "save_checkpoint", real)
    run_train_step(random_model_dir, [scored[0]], tmp_path / "state.json", tmp_path / "ckpt",
                   options, show_progress=False)
    assert (tmp_path / "state.json").read_bytes() == (tmp_path / "ref.json").read_bytes()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "ckpt" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    # the next step from either continues identically (optimizer moments and RNG included)
    for name in ("ckpt", "ref"):
        state = tmp_path / f"{name}.json" if name == "ref" else tmp_path / "state.json"
        run_train_step(tmp_path / name, [scored[1]], state, tmp_path / f"{name}-2", options,
                       show_progress=False)
    assert (tmp_path / "ckpt-2" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "ref-2" / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow  # two torchrun jobs
def test_two_processes_train_the_adapter_as_one(random_model_dir, scored, tmp_path):
    """FSDP2 (gloo) with LoRA: the adapter, records and SAS state of 2 processes are those
    of 1 (LoRA dropout off: each rank would draw its own masks), and the training state
    reshards 2 -> 1 for the next step."""
    results = {}
    for nproc in (1, 2):
        folder = tmp_path / f"n{nproc}"
        folder.mkdir()
        args = ["train-step", "--model", random_model_dir, "--scored", scored[0], "--state",
                folder / "state.json", "--out", folder / "ckpt-1", "--algo", "grpo",
                "--micro-batch-tokens", "64", "--lr", "1e-2", "--warmup-steps", "0",
                "--lora-dropout", "0", *LORA]
        if nproc > 1:
            args += ["--nproc-per-node", str(nproc)]
        result = run_dcpo(*args)
        assert result.code == 0, result.stderr[-3000:]
        results[nproc] = folder / "ckpt-1"
    one, two = adapter_weights(results[1]), adapter_weights(results[2])
    assert one.keys() == two.keys()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-5
    assert any(v.any() for k, v in two.items() if "lora_B" in k)
    assert (tmp_path / "n1" / "state.json").read_bytes() == \
        (tmp_path / "n2" / "state.json").read_bytes()
    m1, m2 = (json.loads((results[n] / "metrics.json").read_text()) for n in (1, 2))
    assert m1["trainable_parameters"] == m2["trainable_parameters"]
    assert m1["optimizer_state_bytes"] == m2["optimizer_state_bytes"]  # summed over ranks
    assert m1["kl_ref"] == m2["kl_ref"] == 0.0
    for key in ("loss", "grad_norm", "approx_kl", "entropy", "clip_ratio"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-5, abs=1e-6), key
    assert len(list((results[2] / "training_state").glob("*.distcp"))) == 2
    # 2 -> 1: continue the two-process checkpoint in one process
    shutil.copy(tmp_path / "n2" / "state.json", tmp_path / "n2" / "state-1.json")
    result = run_dcpo("train-step", "--model", results[2], "--scored", scored[1], "--state",
                      tmp_path / "n2" / "state-1.json", "--out", tmp_path / "n2" / "ckpt-2",
                      "--algo", "grpo", "--micro-batch-tokens", "64", "--lr", "1e-2",
                      "--warmup-steps", "0", "--lora-dropout", "0", *LORA)
    assert result.code == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_bad_lora_inputs_are_one_line_errors(lora_step, random_model_dir, scored, tmp_path):
    root, ckpt = lora_step

    def step(model, *extra):
        out = tmp_path / "out"
        result = run_dcpo("train-step", "--model", model, "--scored", scored[1], "--state",
                          tmp_path / "state.json", "--out", out, *FAST, *extra)
        assert not out.exists() and not (tmp_path / "state.json").exists()
        return result

    for rank in ("0", "-3"):
        assert_one_line_error(step(random_model_dir, "--lora-rank", rank),
                              "--lora-rank must be at least 1")
    assert_one_line_error(step(random_model_dir, *LORA, "--lora-target-modules",
                               "q_proj,qkv_proj"), "--lora-target-modules qkv_proj",
                          "no linear module")
    other = tmp_path / "other-model"
    shutil.copytree(random_model_dir, other)
    assert_one_line_error(step(ckpt, "--ref-model", other),
                          f"--ref-model {other}", "with LoRA the KL reference is",
                          str(random_model_dir.resolve()))
    assert_one_line_error(step(ckpt, "--lora-rank", "8"), "lora_rank = 4")
    assert_one_line_error(step(ckpt, *LORA, "--lora-alpha", "16"), "lora_alpha = 32")
    assert_one_line_error(step(random_model_dir, "--lora-dropout", "1.5", *LORA),
                          "--lora-dropout must be in [0, 1)")
    # a full fine-tuning checkpoint cannot turn into a LoRA one
    full = tmp_path / "full"
    run_train_step(random_model_dir, [scored[0]], tmp_path / "full.json", full,
                   TrainOptions(lr=1e-3, micro_batch_tokens=256), show_progress=False)
    (tmp_path / "full.json").rename(tmp_path / "state.json")
    result = run_dcpo("train-step", "--model", full, "--scored", scored[1], "--state",
                      tmp_path / "state.json", "--out", tmp_path / "out", *FAST, *LORA)
    assert_one_line_error(result, "a full fine-tuning checkpoint")
    assert not (tmp_path / "out").exists()

    for flags, fragment in ((["--lora-rank", "0"], "--lora-rank must be at least 1"),
                            ([*LORA, "--lora-target-modules", "attn"],
                             "--lora-target-modules attn: the tiny model has no")):
        run_dir = tmp_path / "run"
        result = run_dcpo("run", run_dir, "--steps", "1", "--tiny-size", "test", *flags)
        assert_one_line_error(result, fragment)
        assert not run_dir.exists()


LORA_RUN = ["--lora-rank", "4", "--lora-dropout", "0.1"]


@pytest.fixture(scope="module")
def lora_shell_run(tmp_path_factory, env):
    """examples/tiny_loop.sh with LoRA (TRAIN_ARGS), 2 steps: the reference."""
    run_dir = tmp_path_factory.mktemp("lora-shell") / "run"
    finish(shell_loop(run_dir, 2, env), {**env, "TRAIN_ARGS": " ".join(LORA_RUN)})
    return run_dir


@pytest.mark.slow
def test_dcpo_run_with_lora_writes_the_shell_loops_files(lora_shell_run, env, tmp_path):
    """`dcpo run --lora-rank` (adapters swapped into its one engine) gives the shell loop's
    rollouts, adapters, training state, RNG and metrics; so does a run SIGKILLed at random
    points and resumed."""
    from conftest import kill_at_random_progress

    run_dir = with_tiny_of(tmp_path / "run", lora_shell_run)
    output = finish(dcpo_run(run_dir, 2, [*RUN_FLAGS, *LORA_RUN]), env)
    assert "2 in-memory weight update(s)" in output  # both adapters went into the engine
    assert_same_run(run_dir, lora_shell_run, steps=2)
    killed = tmp_path / "killed"
    kills = kill_at_random_progress(dcpo_run(killed, 2, [*RUN_FLAGS, *LORA_RUN]), env, killed,
                                    lora_shell_run, attempts=3)
    assert kills >= 2
    finish(dcpo_run(killed, None, flags=[]), env)
    assert_same_run(killed, lora_shell_run, steps=2)
