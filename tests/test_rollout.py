"""dcpo rollout: prompt selection, shards, the hf engine's tokens and log-probs, the file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, run_dcpo
from hypothesis import given, settings
from hypothesis import strategies as st

from dcpo_cli.cli import run
from dcpo_cli.engines import SamplingSettings, load_engine
from dcpo_cli.engines.hf import token_budget_batches
from dcpo_cli.engines.prompting import encode_prompts
from dcpo_cli.errors import DcpoError
from dcpo_cli.files import contracts
from dcpo_cli.stages.prepare import prompts_table
from dcpo_cli.stages.rollout import (
    check_batch_size,
    epoch_order,
    parse_shard,
    select_prompts,
    select_round,
    shard_part,
    steps_per_epoch,
)

MAX_NEW = 48


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One thread: on a shared 2-core machine, two spinning threads are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- prompt selection, shards

@st.composite
def _selections(draw):
    num_prompts = draw(st.integers(1, 60))
    return (num_prompts, draw(st.integers(1, num_prompts)), draw(st.integers(0, 2**31)),
            draw(st.integers(1, 5)), draw(st.integers(1, 4)))


@settings(max_examples=80, deadline=None)
@given(_selections())
def test_steps_never_repeat_a_prompt_and_epochs_end_on_a_step(selection):
    """Every step of three epochs, every refill round and shard: a step (all its rounds and
    shards together) never holds a prompt twice; epoch e is steps e*S .. e*S+S-1 (S =
    prompts // batch size), which train distinct prompts, all but the permutation's last
    prompts % batch size; the rollouts of shards i/n together are the unsharded step's."""
    num_prompts, batch_size, seed, shards, rounds = selection
    per_epoch = steps_per_epoch(num_prompts, batch_size)
    assert per_epoch == num_prompts // batch_size >= 1
    rounds = min(rounds, num_prompts // batch_size)  # more rounds are refused (next test)
    for epoch in range(3):
        trained = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            step_prompts = []
            for round_index in range(rounds):
                chosen = select_round(num_prompts, batch_size, step, seed, round_index)
                parts = [shard_part(chosen, (i, shards)) for i in range(shards)]
                assert [x for part in parts for x in part] == chosen
                step_prompts += chosen
            assert len(step_prompts) == len(set(step_prompts)) == rounds * batch_size
            trained += select_prompts(num_prompts, batch_size, step, seed)
        assert len(trained) == len(set(trained)) == per_epoch * batch_size
        left_out = set(range(num_prompts)) - set(trained)
        assert left_out == set(epoch_order(num_prompts, epoch, seed)[len(trained):])


def test_a_step_spanning_the_old_epoch_boundary_draws_distinct_prompts():
    """The reported case: 620 prompts, 32 per step, seed 1; step 19 used to take the last 12
    prompts of epoch 0 and the first 20 of epoch 1, drawing some twice. Now it is epoch 1's
    first step, and the 12 prompts epoch 0's permutation ends with sat epoch 0 out."""
    step19 = select_prompts(620, 32, 19, seed=1)
    assert len(set(step19)) == 32
    assert step19 == epoch_order(620, 1, seed=1)[:32]
    epoch0 = [i for step in range(19) for i in select_prompts(620, 32, step, seed=1)]
    assert len(set(epoch0)) == 608 and set(epoch0) == set(epoch_order(620, 0, 1)[:608])


def test_a_batch_larger_than_the_prompts_is_refused():
    with pytest.raises(DcpoError, match="train.parquet: --batch-size 9 is more than its 8"):
        check_batch_size(8, 9, Path("data/train.parquet"))
    with pytest.raises(ValueError):
        select_prompts(8, 9, 0, seed=0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(), max_size=40), st.integers(1, 9))
def test_shards_partition_the_batch_in_order(items, count):
    parts = [shard_part(items, (i, count)) for i in range(count)]
    assert [x for part in parts for x in part] == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("text", ["2/2", "-1/2", "a/b", "3", "0/0"])
def test_parse_shard_rejects(text):
    with pytest.raises(DcpoError, match="--shard"):
        parse_shard(text)
    assert parse_shard("1/4") == (1, 4)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=30), st.integers(1, 20),
       st.integers(1, 400))
def test_token_budget_batches_respect_the_budget(lengths, max_new, budget):
    batches = token_budget_batches(lengths, max_new, budget)
    assert [i for batch in batches for i in batch] == list(range(len(lengths)))
    for batch in batches:
        padded = len(batch) * (max(lengths[i] for i in batch) + max_new)
        assert padded <= budget or len(batch) == 1


# ---------------------------------------------------------------- the hf engine

PROMPTS = ["What is 1+1?", "Compute 17*3, then add 5.", "x",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "9-4?"}]]


@pytest.fixture(scope="module")
def engine(random_model_dir):
    return load_engine("hf", random_model_dir, token_budget=200)  # small: several batches


def _teacher_forced(model, prompt_ids, response_ids):
    """Per-position logits of the response tokens from one unpadded forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + response_ids])).logits[0].float()
    return logits[len(prompt_ids) - 1:-1]


def _check_completions(engine, encoded, groups, settings):
    eos = engine.eos_ids
    assert len(groups) == len(encoded)
    for group in groups:
        assert len(group) == settings.n
        for c in group:
            assert engine.tokenizer.decode(c.token_ids, skip_special_tokens=True) == c.text
            assert len(c.logprobs) == len(c.token_ids) <= settings.max_new_tokens
            assert all(math.isfinite(x) and x <= 0 for x in c.logprobs)
            assert not eos & set(c.token_ids[:-1])  # cut at the first eos
            if c.finish_reason == "length":
                assert len(c.token_ids) == settings.max_new_tokens
                assert c.token_ids[-1] not in eos
            else:
                assert c.finish_reason == "stop" and c.token_ids[-1] in eos


def test_sampled_logprobs_equal_a_teacher_forced_recomputation(engine):
    encoded = encode_prompts(engine.tokenizer, PROMPTS)
    settings = SamplingSettings(n=6, max_new_tokens=MAX_NEW, seed=5)
    groups = engine.generate([ids for _, ids in encoded], settings)
    _check_completions(engine, encoded, groups, settings)
    reasons = {c.finish_reason for group in groups for c in group}
    assert reasons == {"stop", "length"}  # both ways of ending are exercised
    for (_, prompt_ids), group in zip(encoded, groups, strict=True):
        for c in group:
            logits = _teacher_forced(engine.model, prompt_ids, c.token_ids)
            expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None])
            assert torch.allclose(torch.tensor(c.logprobs), expected[:, 0], atol=1e-4)


def test_logprobs_are_those_of_the_warped_sampling_distribution(engine):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    encoded = encode_prompts(engine.tokenizer, PROMPTS[:2])
    settings = SamplingSettings(n=2, temperature=0.7, top_k=7, top_p=0.9, max_new_tokens=16,
                                seed=3)
    groups = engine.generate([ids for _, ids in encoded], settings)
    _check_completions(engine, encoded, groups, settings)
    for (_, prompt_ids), group in zip(encoded, groups, strict=True):
        for c in group:
            scores = _teacher_forced(engine.model, prompt_ids, c.token_ids)
            for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(7),
                           TopPLogitsWarper(0.9)):
                scores = warper(None, scores)
            expected = torch.log_softmax(scores, -1).gather(1, torch.tensor(c.token_ids)[:, None])
            assert torch.allclose(torch.tensor(c.logprobs), expected[:, 0], atol=1e-4)


def test_the_models_own_sampling_defaults_are_not_applied(random_model_dir, tmp_path):
    """Hub models ship sampling defaults (top-k, temperature) in generation_config.json;
    transformers would apply them after our recorder. Here they would make sampling greedy."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(random_model_dir, model_dir)
    config = json.loads((model_dir / "generation_config.json").read_text()) \
        if (model_dir / "generation_config.json").is_file() else {}
    config.update(do_sample=True, top_k=1, temperature=0.05, repetition_penalty=2.0)
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    engine = load_engine("hf", model_dir)
    encoded = encode_prompts(engine.tokenizer, PROMPTS[:2])
    groups = engine.generate([ids for _, ids in encoded],
                             SamplingSettings(n=2, max_new_tokens=12, seed=4))
    not_argmax = 0
    for (_, prompt_ids), group in zip(encoded, groups, strict=True):
        for c in group:
            logits = _teacher_forced(engine.model, prompt_ids, c.token_ids)
            expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids)[:, None])
            assert torch.allclose(torch.tensor(c.logprobs), expected[:, 0], atol=1e-4)
            not_argmax += sum(a != t for a, t in zip(logits.argmax(-1).tolist(), c.token_ids,
                                                     strict=True))
    assert not_argmax > 0  # temperature 1.0 over the full vocabulary, not top-1


def test_greedy_takes_the_argmax_and_is_repeatable(engine):
    encoded = encode_prompts(engine.tokenizer, PROMPTS)
    settings = SamplingSettings(n=1, temperature=0, max_new_tokens=12)
    groups = engine.generate([ids for _, ids in encoded], settings)
    assert groups == engine.generate([ids for _, ids in encoded], settings)
    for (_, prompt_ids), (c,) in zip(encoded, groups, strict=True):
        logits = _teacher_forced(engine.model, prompt_ids, c.token_ids)
        assert logits.argmax(-1).tolist() == c.token_ids


def test_same_seed_same_samples_other_seed_other_samples(engine):
    ids = [ids for _, ids in encode_prompts(engine.tokenizer, PROMPTS)]
    first = engine.generate(ids, SamplingSettings(n=2, max_new_tokens=8, seed=1))
    assert first == engine.generate(ids, SamplingSettings(n=2, max_new_tokens=8, seed=1))
    assert first != engine.generate(ids, SamplingSettings(n=2, max_new_tokens=8, seed=2))


# ---------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    rows = [{"prompt_id": f"p{i:02d}", "answer": str(2 * i), "problem": "", "source": "test",
             "prompt": [{"role": "user", "content": f"What is {i}+{i}?" + " Think." * (i % 5)}]}
            for i in range(20)]
    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    contracts.write_table(prompts_table(rows), path, contracts.make_metadata("prompts", "test"))
    return path


def _rollout(model, prompts, out, *extra):
    args = ["rollout", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
            "--batch-size", "8", "--n", "4", "--max-new-tokens", str(MAX_NEW), "--seed", "7",
            *map(str, extra)]
    assert run(args) == 0
    return contracts.read_table(out, "rollouts")


def test_rollout_file_meets_the_contract(random_model_dir, prompts_file, tmp_path):
    from transformers import AutoTokenizer

    table = _rollout(random_model_dir, prompts_file, tmp_path / "r.parquet", "--step", 0)
    assert table.num_rows == 32
    rows = table.to_pylist()
    assert {r["step"] for r in rows} == {0}
    assert len({r["prompt_id"] for r in rows}) == 8
    assert sorted(r["sample_index"] for r in rows) == sorted(list(range(4)) * 8)
    tokenizer = AutoTokenizer.from_pretrained(random_model_dir)
    eos = tokenizer.eos_token_id
    for r in rows:
        assert tokenizer.decode(r["response_token_ids"], skip_special_tokens=True) == \
            r["response_text"]
        assert tokenizer(r["prompt_text"], add_special_tokens=False)["input_ids"] == \
            r["prompt_token_ids"]
        assert r["prompt_text"].startswith("<|im_start|>user\n")
        assert r["answer"] == str(2 * int(r["prompt_id"][1:]))
        assert len(r["response_logprobs"]) == len(r["response_token_ids"])
        assert all(math.isfinite(x) and x <= 0 for x in r["response_logprobs"])
        hit_limit = len(r["response_token_ids"]) == MAX_NEW and r["response_token_ids"][-1] != eos
        assert r["finish_reason"] == ("length" if hit_limit else "stop")
    meta = contracts.read_metadata(tmp_path / "r.parquet")
    assert meta["kind"] == "rollouts" and meta["step"] == 0 and meta["max_new_tokens"] == MAX_NEW
    assert meta["model"] == str(random_model_dir) and len(meta["model_fingerprint"]) == 64
    assert meta["policy_step"] == 0  # a base model, not a train-step checkpoint
    assert meta["options"]["n"] == 4 and meta["seed"] == 7 and meta["skipped_prompts"] == 0


def _content(path):
    """The rows and the metadata, less the timings (which differ from run to run)."""
    meta = contracts.read_metadata(path)
    for key in ("engine_load_seconds", "generate_seconds"):
        assert meta.pop(key) >= 0
    return contracts.read_table(path, "rollouts").to_pylist(), meta


@pytest.mark.slow
def test_rollout_is_reproducible_and_steps_and_shards_select_prompts(
        random_model_dir, prompts_file, tmp_path, monkeypatch):
    def ids(table):
        return set(table.column("prompt_id").to_pylist())

    step0 = _rollout(random_model_dir, prompts_file, tmp_path / "a.parquet", "--step", 0)
    _rollout(random_model_dir, prompts_file, tmp_path / "b.parquet", "--step", 0)
    assert _content(tmp_path / "a.parquet") == _content(tmp_path / "b.parquet")
    # a separate process gives the same bytes too
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = run_dcpo("rollout", "--model", random_model_dir, "--prompts", prompts_file,
                      "--out", tmp_path / "c.parquet", "--batch-size", 8, "--n", 4,
                      "--max-new-tokens", MAX_NEW, "--seed", 7, "--step", 0)
    assert result.code == 0, result.stderr
    assert "32 responses to 8 prompts" in result.stdout
    assert _content(tmp_path / "a.parquet") == _content(tmp_path / "c.parquet")

    step1 = _rollout(random_model_dir, prompts_file, tmp_path / "s1.parquet", "--step", 1)
    assert not ids(step0) & ids(step1)
    shards = [_rollout(random_model_dir, prompts_file, tmp_path / f"sh{i}.parquet", "--step", 0,
                       "--shard", f"{i}/3") for i in range(3)]
    assert [len(ids(s)) for s in shards] == [3, 3, 2]
    assert set().union(*map(ids, shards)) == ids(step0)
    assert sum(s.num_rows for s in shards) == 32


def test_long_prompts_are_skipped_and_counted(random_model_dir, prompts_file, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(random_model_dir)
    table = contracts.read_table(prompts_file, "prompts")
    chosen = [table.column("prompt").to_pylist()[i] for i in select_prompts(20, 8, 0, 7)]
    lengths = [len(ids) for _, ids in encode_prompts(tokenizer, chosen)]
    limit = sorted(lengths)[3]
    kept = sum(n <= limit for n in lengths)
    out = _rollout(random_model_dir, prompts_file, tmp_path / "r.parquet", "--step", 0,
                   "--max-prompt-tokens", limit)
    assert out.num_rows == kept * 4
    assert all(len(ids) <= limit for ids in out.column("prompt_token_ids").to_pylist())
    assert contracts.read_metadata(tmp_path / "r.parquet")["skipped_prompts"] == 8 - kept
    with pytest.raises(DcpoError, match="longer than --max-prompt-tokens"):
        from dcpo_cli.stages.rollout import RolloutOptions, run_rollout

        run_rollout(random_model_dir, prompts_file, 0, tmp_path / "x.parquet",
                    RolloutOptions(batch_size=8, max_prompt_tokens=1))
    assert not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize(("extra", "fragments"), [
    (["--shard", "3/2"], ["--shard"]),
    (["--n", "0"], ["--n must be at least 1"]),
    (["--top-p", "1.5"], ["--top-p"]),
    (["--engine", "tpu"], ["--engine must be auto, hf, vllm or server, not 'tpu'"]),
])
def test_bad_options_give_one_line_errors(random_model_dir, prompts_file, tmp_path, extra,
                                          fragments):
    result = run_dcpo("rollout", "--model", random_model_dir, "--prompts", prompts_file,
                      "--step", 0, "--out", tmp_path / "r.parquet", *extra)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "r.parquet").exists()


@pytest.mark.slow
def test_bad_inputs_give_one_line_errors(random_model_dir, prompts_file, tmp_path):
    base = ["rollout", "--step", "0", "--out", tmp_path / "r.parquet"]
    result = run_dcpo(*base, "--model", random_model_dir, "--prompts", tmp_path / "none.parquet")
    assert_one_line_error(result, "none.parquet", "no such file")
    result = run_dcpo(*base, "--model", tmp_path, "--prompts", prompts_file, "--batch-size", 8)
    assert_one_line_error(result, "not a model directory")
    result = run_dcpo(*base, "--model", random_model_dir, "--prompts", prompts_file)
    assert_one_line_error(result, "prompts.parquet: --batch-size 64 is more than its 20 prompts")
    result = run_dcpo(*base, "--model", random_model_dir, "--prompts", prompts_file,
                      "--step", "-1")
    assert_one_line_error(result, "--step")


def test_rollout_checks_its_own_output_before_writing(random_model_dir, prompts_file, tmp_path,
                                                      monkeypatch):
    """A selection that repeated a prompt (the epoch-boundary bug) is refused by rollout
    itself, naming the repeated response, and no file is written."""
    from dcpo_cli.stages import rollout

    monkeypatch.setattr(rollout, "select_round", lambda *args: [3, 5, 3, 7])
    with pytest.raises(DcpoError, match=r"r.parquet: the same response .* more than once"):
        rollout.run_rollout(random_model_dir, prompts_file, 0, tmp_path / "r.parquet",
                            rollout.RolloutOptions(batch_size=4, n=2, max_new_tokens=4))
    assert not (tmp_path / "r.parquet").exists()
