"""train-step's objective additions: the KL loss to a reference policy (issue 12), the
sampler-trainer mismatch metrics and rollout correction, and log-probs at the rollouts'
temperature (issue 14)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch
from builders import write_rollouts, write_scored
from conftest import assert_one_line_error, run_dcpo

from dcpo_cli.core import algorithms
from dcpo_cli.core.presets import resolve_config
from dcpo_cli.errors import DcpoError, FieldError
from dcpo_cli.files import contracts
from dcpo_cli.options import TrainOptions
from dcpo_cli.train.inputs import load_scored
from dcpo_cli.train.step import run_train_step
from dcpo_cli.train.update import kl_loss, rollout_corrected

REWARDS = {"p0": [1, 0, 0, 1], "p1": [0, 0, 0, 1]}
# The ratio pi_old / pi_sampler each response token is given, in turn (none at 0.5 or 2,
# the edges of the outside-ratio count and of the cap).
RHOS = [3.0, 0.4, 1.5, 1.0, 2.5, 0.8]


def rewrite(path: Path, columns: dict[str, list] | None = None, drop: str | None = None,
            **extra) -> Path:
    """A scored file with some columns replaced or dropped and metadata keys added."""
    table = contracts.read_table(path, "scored")
    for name, values in (columns or {}).items():
        index = table.schema.get_field_index(name)
        table = table.set_column(index, table.schema.field(index), pa.array(
            values, table.schema.field(index).type))
    if drop:
        table = table.drop_columns([drop])
    meta = {**contracts.read_metadata(path), **extra}
    path.unlink()
    contracts.write_table(table, path, meta, validate_kind=False)
    return path


def trainer_logprobs(model_dir: Path, path: Path, temperature: float = 1.0
                     ) -> list[list[float]]:
    """Each response token's log-prob under the model at `temperature`, from a full
    log-softmax (independent of the chunked path train-step uses)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for row in contracts.read_table(path, "scored").to_pylist():
        prompt, response = row["prompt_token_ids"], row["response_token_ids"]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(ids).logits[0].double() / temperature
        logp = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
        out.append(logp.gather(-1, torch.tensor(response)[:, None])[:, 0].tolist())
    return out


def group_advantages(rewards: list[float]) -> list[float]:
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (len(rewards) - 1))
    return [(r - mean) / (std + 1e-6) for r in rewards]


def records(ckpt: Path) -> dict[tuple[str, int], dict]:
    rows = contracts.read_table(ckpt / "train_records.parquet", "train_records").to_pylist()
    return {(r["prompt_id"], r["sample_index"]): r for r in rows}


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


# ------------------------------------------------------------------ the combined loss by hand


def test_combined_loss_by_hand():
    """Surrogate at ratio 1 (-A per token) times the TIS weights, aggregated
    seq-mean-token-mean, plus kl_coef times the aggregated low_var_kl to the reference."""
    mask = torch.tensor([[True, True, False], [True, True, True]])
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -1.5, -0.25]])
    rhos = [[3.0, 0.5], [1.0, 1.5, 4.0]]
    sampler = [[-1.0 - math.log(3.0), -2.0 - math.log(0.5)],
               [-0.5, -1.5 - math.log(1.5), -0.25 - math.log(4.0)]]
    ref = {0: torch.tensor([-1.5, -2.0]), 1: torch.tensor([-0.5, -1.0, -0.75])}
    config = resolve_config("grpo", kl_coef=0.1)
    ctx = SimpleNamespace(config=config, ref=ref, max_length=None,
                          options=TrainOptions(rollout_correction="tis",
                                               rollout_correction_cap=2.0),
                          data=SimpleNamespace(sampler_logprobs=sampler))
    batch = SimpleNamespace(rows=[0, 1], response_mask=mask)
    adv = torch.tensor([1.0, -0.5])
    terms = algorithms.surrogate_loss(config, logp, logp, adv, mask)
    per_token = rollout_corrected(ctx, batch, terms.per_token, logp)
    loss = algorithms.aggregate_loss(per_token, mask, config.loss_agg, 2, 5)
    loss = loss + kl_loss(ctx, batch, logp, 2, 5)

    weights = [[min(r, 2.0) for r in row] for row in rhos]  # [[2, .5], [1, 1.5, 2]]
    token_losses = [[-1.0 * w for w in weights[0]], [0.5 * w for w in weights[1]]]
    surrogate = (sum(token_losses[0]) / 2 + sum(token_losses[1]) / 3) / 2  # -0.25

    def k3(x):  # x = ref - logp
        return math.exp(x) - x - 1

    kl = (k3(-0.5) + k3(0.0)) / 2, (k3(0.0) + k3(0.5) + k3(-0.5)) / 3
    want = surrogate + 0.1 * (kl[0] + kl[1]) / 2
    assert surrogate == pytest.approx(-0.25)
    assert float(loss) == pytest.approx(want, abs=1e-6)
    assert float(loss) == pytest.approx(-0.2430825, abs=1e-6)
    # kl_coef 0 and no correction: the plain policy loss, untouched
    plain = SimpleNamespace(config=resolve_config("grpo", kl_coef=0), ref=None,
                            options=TrainOptions(rollout_correction="none"), data=ctx.data,
                            max_length=None)
    assert kl_loss(plain, batch, logp, 2, 5) == 0.0
    assert rollout_corrected(plain, batch, terms.per_token, logp) is terms.per_token


def test_presets_carry_the_kl():
    assert (resolve_config("grpo").kl_coef, resolve_config("grpo").kl_type) == (0.001,
                                                                                "low_var_kl")
    assert (resolve_config("gspo").kl_coef, resolve_config("gspo").kl_type) == (0.001,
                                                                                "low_var_kl")
    assert resolve_config("dcpo").kl_coef == 0 and resolve_config("dapo").kl_coef == 0
    assert resolve_config("grpo", kl_coef=0).kl_coef == 0
    assert resolve_config("dcpo", kl_type="k3").kl_type == "low_var_kl"
    with pytest.raises(FieldError, match="kl_coef must be >= 0") as caught:
        resolve_config("grpo", kl_coef=-0.1)
    assert caught.value.fields == ("kl_coef",)
    with pytest.raises(FieldError, match="kl_type must be one of") as caught:
        resolve_config("grpo", kl_type="k9")
    assert caught.value.fields == ("kl_type",)


# ------------------------------------------------------------------ the KL in train-step

FAST = dict(lr=1e-3, warmup_steps=0, micro_batch_tokens=256)


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, random_model_dir, tokenizer):
    """Two GRPO steps with the preset's KL (0.001 low_var_kl): the second continues from the
    first's checkpoint, its reference still the base model."""
    root = tmp_path_factory.mktemp("kl")
    outcomes = []
    model = random_model_dir
    for step in (0, 1):
        scored = write_scored(root / f"scored-{step}.parquet", tokenizer, step, REWARDS)
        out = root / f"ckpt-{step + 1}"
        outcomes.append(run_train_step(model, [scored], root / "state.json", out,
                                       TrainOptions(algo="grpo", **FAST), show_progress=False))
        model = out
    return root, outcomes


def test_kl_ref_is_zero_at_the_first_step_and_positive_later(grpo_run, random_model_dir):
    root, (first, second) = grpo_run
    trainer = json.loads((root / "ckpt-1" / "trainer_state.json").read_text())
    assert trainer["algo_config"]["kl_coef"] == 0.001  # the grpo preset's default
    assert trainer["algo_config"]["kl_type"] == "low_var_kl"
    assert trainer["ref_model"] == str(Path(random_model_dir).resolve())
    assert trainer["ref_model_revision"] is None
    assert first.metrics["kl_ref"] == pytest.approx(0.0, abs=1e-12)
    assert second.metrics["kl_ref"] > 1e-6
    again = json.loads((root / "ckpt-2" / "trainer_state.json").read_text())
    assert again["ref_model"] == trainer["ref_model"]


def test_another_reference_than_the_recorded_one_is_refused(grpo_run, tokenizer, tmp_path):
    root, _ = grpo_run
    other = tmp_path / "other"
    shutil.copytree(root / "ckpt-2", other)  # the newest: it keeps its training state
    scored = write_scored(tmp_path / "scored-2.parquet", tokenizer, 2, REWARDS)
    shutil.copy(root / "ckpt-2" / "sas_state.json", tmp_path / "state.json")
    with pytest.raises(DcpoError, match="every step must use the same one"):
        run_train_step(root / "ckpt-2", [scored], tmp_path / "state.json", tmp_path / "c",
                       TrainOptions(algo="grpo", ref_model=str(other), **FAST),
                       show_progress=False)
    assert not (tmp_path / "c").exists()


def policy_shift(model_dir: Path, ckpt: Path, scored: Path) -> float:
    """How far the step moved the policy toward the advantage: the mean over responses of
    A * (mean new log-prob - mean old log-prob)."""
    before = trainer_logprobs(model_dir, scored)
    after = trainer_logprobs(ckpt, scored)
    rows = contracts.read_table(scored, "scored").to_pylist()
    advantages = {}
    for prompt, rewards in REWARDS.items():
        for i, a in enumerate(group_advantages([float(r) for r in rewards])):
            advantages[prompt, i] = a
    shifts = [advantages[r["prompt_id"], r["sample_index"]]
              * (sum(a) / len(a) - sum(b) / len(b))
              for r, a, b in zip(rows, after, before, strict=True)]
    return sum(shifts) / len(shifts)


def test_the_kl_holds_the_policy_back(random_model_dir, tokenizer, tmp_path):
    scored = write_scored(tmp_path / "scored.parquet", tokenizer, 0, REWARDS)
    shifts, deltas = {}, {}
    base = load_weights(random_model_dir)
    for coef in (0.0, 0.001, 1.0):
        out = tmp_path / f"ckpt-{coef}"
        run_train_step(random_model_dir, [scored], tmp_path / f"s-{coef}.json", out,
                       TrainOptions(algo="grpo", overrides={"kl_coef": coef}, epochs=4,
                                    mini_batch_size=1, **FAST), show_progress=False)
        shifts[coef] = policy_shift(random_model_dir, out, scored)
        after = load_weights(out)
        deltas[coef] = math.sqrt(sum(float((after[k] - base[k]).pow(2).sum()) for k in base))
    assert shifts[0.0] > 0  # the update follows the advantage
    assert shifts[1.0] < shifts[0.0] and deltas[1.0] < deltas[0.0]
    assert shifts[0.001] < shifts[0.0] and deltas[0.001] < deltas[0.0]


@pytest.mark.slow
def test_kl_bad_inputs_are_one_line_errors(random_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scored = write_scored(tmp_path / "scored.parquet", tokenizer, 0, REWARDS)
    result = run_dcpo("train-step", "--model", random_model_dir, "--scored", scored,
                      "--state", tmp_path / "s.json", "--out", tmp_path / "c",
                      "--algo", "grpo", "--kl-coef", "-1")
    assert_one_line_error(result, "--kl-coef must be >= 0")
    wider = tmp_path / "wider"
    model = AutoModelForCausalLM.from_pretrained(random_model_dir)
    model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + 8)
    model.save_pretrained(wider)
    AutoTokenizer.from_pretrained(random_model_dir).save_pretrained(wider)
    result = run_dcpo("train-step", "--model", random_model_dir, "--scored", scored,
                      "--state", tmp_path / "s.json", "--out", tmp_path / "c",
                      "--algo", "grpo", "--ref-model", wider)
    assert_one_line_error(result, "wider", "vocabulary")
    assert not (tmp_path / "c").exists() and not (tmp_path / "s.json").exists()
    # without the KL no reference is resolved or loaded, and none is recorded
    outcome = run_train_step(random_model_dir, [scored], tmp_path / "s.json", tmp_path / "c",
                             TrainOptions(algo="grpo", overrides={"kl_coef": 0.0},
                                          ref_model=str(tmp_path / "absent"), **FAST),
                             show_progress=False)
    assert outcome.metrics["kl_ref"] is None
    assert "ref_model" not in json.loads((tmp_path / "c" / "trainer_state.json").read_text())


# ------------------------------------------------------------------ mismatch and correction


def with_sampler_rhos(model_dir: Path, scored: Path, temperature: float = 1.0
                      ) -> list[list[float]]:
    """Give the scored file sampler log-probs whose ratio to the trainer's is RHOS, token by
    token; return the ratios."""
    old = trainer_logprobs(model_dir, scored, temperature)
    rhos = [[RHOS[(i + t) % len(RHOS)] for t in range(len(row))] for i, row in enumerate(old)]
    sampler = [[o - math.log(r) for o, r in zip(row, ratios, strict=True)]
               for row, ratios in zip(old, rhos, strict=True)]
    rewrite(scored, {"response_logprobs": sampler})
    return rhos


@pytest.mark.parametrize("mode", ["tis", "mask"])
def test_rollout_correction_weights_and_loss_by_hand(mode, random_model_dir, tokenizer,
                                                     tmp_path):
    scored = write_scored(tmp_path / "scored.parquet", tokenizer, 0, REWARDS)
    rhos = with_sampler_rhos(random_model_dir, scored)
    # one update over all prompts: the ratio is exactly 1, so each token's loss is -A * w
    outcome = run_train_step(
        random_model_dir, [scored], tmp_path / "s.json", tmp_path / "c",
        TrainOptions(algo="grpo", overrides={"kl_coef": 0.0}, mini_batch_size=2,
                     rollout_correction=mode, rollout_correction_cap=2.0, **FAST),
        show_progress=False)

    def weight(rho):
        return min(rho, 2.0) if mode == "tis" else (rho if rho <= 2.0 else 0.0)

    rows = contracts.read_table(scored, "scored").to_pylist()
    recs = records(tmp_path / "c")
    advantages = {(p, i): a for p, rewards in REWARDS.items()
                  for i, a in enumerate(group_advantages([float(r) for r in rewards]))}
    response_losses, all_rhos = [], []
    for row, ratios in zip(rows, rhos, strict=True):
        key = (row["prompt_id"], row["sample_index"])
        weights = [weight(r) for r in ratios]
        assert recs[key]["rollout_weight_mean"] == pytest.approx(
            sum(weights) / len(weights), rel=1e-4)
        response_losses.append(sum(-advantages[key] * w for w in weights) / len(weights))
        all_rhos += ratios
    metrics = outcome.metrics
    assert metrics["updates"] == 1
    assert metrics["loss"] == pytest.approx(sum(response_losses) / len(rows), rel=1e-4,
                                            abs=1e-6)
    n = len(all_rhos)
    assert metrics["mismatch_kl"] == pytest.approx(
        sum(r - 1 - math.log(r) for r in all_rhos) / n, rel=1e-4)
    assert metrics["mismatch_logprob_diff"] == pytest.approx(
        sum(abs(math.log(r)) for r in all_rhos) / n, rel=1e-4)
    assert metrics["mismatch_outside_ratio"] == pytest.approx(
        sum(not 0.5 <= r <= 2 for r in all_rhos) / n)


def test_without_correction_the_weights_are_one_and_the_loss_is_plain(
        random_model_dir, tokenizer, tmp_path):
    scored = write_scored(tmp_path / "scored.parquet", tokenizer, 0, REWARDS)
    with_sampler_rhos(random_model_dir, scored)
    outcome = run_train_step(random_model_dir, [scored], tmp_path / "s.json", tmp_path / "c",
                             TrainOptions(algo="grpo", overrides={"kl_coef": 0.0},
                                          mini_batch_size=2, **FAST), show_progress=False)
    assert all(r["rollout_weight_mean"] == 1.0 for r in records(tmp_path / "c").values())
    # -A averaged per response, then over responses: the advantages sum to ~0 per group
    assert outcome.metrics["loss"] == pytest.approx(0.0, abs=1e-5)
    assert outcome.metrics["mismatch_kl"] > 0


def test_untrained_responses_have_no_weight(random_model_dir, tokenizer, tmp_path):
    scored = write_scored(tmp_path / "scored.parquet", tokenizer, 0,
                          {"p0": [1, 1, 1, 1], "p1": [0, 0, 0, 1]})
    run_train_step(random_model_dir, [scored], tmp_path / "s.json", tmp_path / "c",
                   TrainOptions(algo="dapo", rollout_correction="tis", **FAST),
                   show_progress=False)
    recs = records(tmp_path / "c")
    assert all(math.isnan(recs["p0", i]["rollout_weight_mean"]) for i in range(4))
    assert all(not math.isnan(recs["p1", i]["rollout_weight_mean"]) for i in range(4))


@pytest.mark.slow
def test_correction_without_sampler_logprobs_is_refused(random_model_dir, tokenizer,
                                                        tmp_path):
    scored = rewrite(write_scored(tmp_path / "bare.parquet", tokenizer, 0, REWARDS),
                     drop="response_logprobs")
    result = run_dcpo("train-step", "--model", random_model_dir, "--scored", scored,
                      "--state", tmp_path / "s.json", "--out", tmp_path / "c",
                      "--rollout-correction", "tis")
    assert_one_line_error(result, "bare.parquet", "response_logprobs", "--rollout-correction")
    assert not (tmp_path / "c").exists() and not (tmp_path / "s.json").exists()
    # without a correction it trains, and has no mismatch to report
    outcome = run_train_step(random_model_dir, [scored], tmp_path / "s.json", tmp_path / "c",
                             TrainOptions(**FAST), show_progress=False)
    assert outcome.metrics["mismatch_kl"] is None
    result = run_dcpo("train-step", "--model", random_model_dir, "--scored", scored,
                      "--state", tmp_path / "s2.json", "--out", tmp_path / "c2",
                      "--rollout-correction", "tis", "--rollout-correction-cap", "0")
    assert_one_line_error(result, "--rollout-correction-cap must be > 0")


# ------------------------------------------------------------------ the rollouts' temperature


def test_score_carries_the_sampling_options(tmp_path):
    from dcpo_cli.options import ScoreOptions
    from dcpo_cli.stages.score import run_score

    options = {"temperature": 0.7, "top_p": 0.9, "top_k": 20}
    a = write_rollouts(tmp_path / "a.parquet", ["\\boxed{1}", "x"], ["1", "1"],
                       options=options)
    b = write_rollouts(tmp_path / "b.parquet", ["\\boxed{2}", "y"], ["2", "2"], start=2,
                       options={**options, "top_k": 0})
    run_score([a, b], tmp_path / "scored.parquet", ScoreOptions(workers=1))
    meta = contracts.read_metadata(tmp_path / "scored.parquet")
    assert meta["sampling"] == {"temperature": 0.7, "top_p": 0.9, "top_k": None}
    hot = write_rollouts(tmp_path / "hot.parquet", ["z", "w"], ["3", "3"], start=4,
                         options={**options, "temperature": 1.2})
    with pytest.raises(DcpoError, match="different temperatures"):
        run_score([a, hot], tmp_path / "mixed.parquet", ScoreOptions(workers=1))
    assert not (tmp_path / "mixed.parquet").exists()


def test_load_scored_reads_the_temperature(tokenizer, tmp_path):
    plain = write_scored(tmp_path / "plain.parquet", tokenizer, 0, REWARDS)
    assert load_scored([plain]).temperature == 1.0  # not recorded: as before
    warm = rewrite(write_scored(tmp_path / "warm.parquet", tokenizer, 0, REWARDS),
                   sampling={"temperature": 0.6, "top_p": 1.0, "top_k": 0})
    data = load_scored([warm])
    assert data.temperature == 0.6 and data.sampling["top_p"] == 1.0
    assert data.sampler_logprobs[0] == [-1.0] * len(data.response_tokens[0])
    greedy = rewrite(write_scored(tmp_path / "greedy.parquet", tokenizer, 0, REWARDS),
                     sampling={"temperature": 0.0})
    assert load_scored([greedy]).temperature == 1.0
    other = rewrite(write_scored(tmp_path / "other.parquet", tokenizer, 0, {"p7": [1, 0]}),
                    sampling={"temperature": 1.0})
    with pytest.raises(DcpoError, match="different temperatures"):
        load_scored([warm, other])


def test_old_logprobs_are_at_the_rollouts_temperature(random_model_dir, tokenizer,
                                                      tmp_path):
    scored = rewrite(write_scored(tmp_path / "scored.parquet", tokenizer, 0, REWARDS),
                     sampling={"temperature": 0.5, "top_p": 1.0, "top_k": 0})
    rhos = with_sampler_rhos(random_model_dir, scored, temperature=0.5)
    outcome = run_train_step(random_model_dir, [scored], tmp_path / "s.json", tmp_path / "c",
                             TrainOptions(**FAST), show_progress=False)
    want = trainer_logprobs(random_model_dir, scored, 0.5)
    rows = contracts.read_table(scored, "scored").to_pylist()
    recs = records(tmp_path / "c")
    for row, logprobs in zip(rows, want, strict=True):
        got = recs[row["prompt_id"], row["sample_index"]]["old_logprob_mean"]
        assert got == pytest.approx(sum(logprobs) / len(logprobs), abs=1e-5)
    flat = [r for ratios in rhos for r in ratios]
    assert outcome.metrics["rollout_temperature"] == 0.5
    assert outcome.metrics["mismatch_logprob_diff"] == pytest.approx(
        sum(abs(math.log(r)) for r in flat) / len(flat), rel=1e-4)


def test_rollout_score_train_agree_at_the_rollout_temperature(random_model_dir, tmp_path):
    """The whole chain: the hf engine's log-probs at temperature 0.7, carried by dcpo score,
    meet the trainer's at the same temperature (fp32 on CPU: equal to rounding); at
    temperature 1 the trainer would be far off."""
    from dcpo_cli.cli import run
    from dcpo_cli.stages.prepare import prompts_table

    rows = [{"prompt_id": f"p{i}", "answer": str(2 * i), "problem": "", "source": "test",
             "prompt": [{"role": "user", "content": f"What is {i}+{i}?"}]} for i in range(4)]
    prompts = tmp_path / "prompts.parquet"
    contracts.write_table(prompts_table(rows), prompts, contracts.make_metadata("prompts", "t"))
    rollouts, scored = tmp_path / "r.parquet", tmp_path / "s.parquet"
    assert run(["rollout", "--model", str(random_model_dir), "--prompts", str(prompts),
                "--out", str(rollouts), "--batch-size", "4", "--n", "4", "--max-new-tokens",
                "16", "--temperature", "0.7", "--engine", "hf", "--step", "0"]) == 0
    assert run(["score", str(rollouts), "--out", str(scored), "--workers", "1"]) == 0
    assert contracts.read_metadata(scored)["sampling"]["temperature"] == 0.7
    options = TrainOptions(algo="grpo", overrides={"kl_coef": 0.0}, rollout_correction="tis",
                           **FAST)
    outcome = run_train_step(random_model_dir, [scored], tmp_path / "st.json", tmp_path / "c",
                             options, show_progress=False)
    assert outcome.metrics["rollout_temperature"] == 0.7
    assert outcome.metrics["mismatch_logprob_diff"] < 1e-5
    assert outcome.metrics["mismatch_outside_ratio"] == 0
    weights = [r["rollout_weight_mean"] for r in records(tmp_path / "c").values()]
    assert weights == pytest.approx([1.0] * len(weights), abs=1e-4)
    # the same tokens scored at temperature 1 (the trainer before this change)
    rewrite(scored, sampling=None)
    cold = run_train_step(random_model_dir, [scored], tmp_path / "st2.json", tmp_path / "c2",
                          TrainOptions(algo="grpo", overrides={"kl_coef": 0.0}, **FAST),
                          show_progress=False)
    assert cold.metrics["rollout_temperature"] == 1.0
    assert cold.metrics["mismatch_logprob_diff"] > 100 * outcome.metrics[
        "mismatch_logprob_diff"]
