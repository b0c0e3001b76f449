"""OTM's gradient shares through a real backward pass of a tiny model (docs/design.md 1.3):
four responses of 100, 300, 1000 and 3000 tokens with equal advantages get shares 0.023 /
0.068 / 0.227 / 0.682 of the gradient under `otm`, and 0.25 each under GRPO's
`seq-mean-token-mean`; the micro-batch split changes neither."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dcpo_cli.core import algorithms as alg
from dcpo_cli.core.batching import collate
from dcpo_cli.tiny.model import TEST_SIZE, build_model, build_tokenizer
from dcpo_cli.train.update import forward_logprobs

LENGTHS = [100, 300, 1000, 3000]


@pytest.fixture(scope="module")
def model_and_rows():
    tokenizer = build_tokenizer()
    size = dataclasses.replace(TEST_SIZE, max_positions=4096)  # room for 3000 tokens
    model = build_model(tokenizer, size, seed=0).float()
    gen = torch.Generator().manual_seed(0)
    prompts = [[1, 2, 3]] * len(LENGTHS)
    responses = [torch.randint(5, len(tokenizer), (n,), generator=gen).tolist()
                 for n in LENGTHS]
    return model, tokenizer, prompts, responses


def shares(model_and_rows, mode: str, parts: list[list[int]]) -> list[float]:
    """Each response's share of |d loss / d log-prob| summed over its tokens, the loss
    backpropagated through the model micro-batch by micro-batch (gradient accumulation)."""
    model, tokenizer, prompts, responses = model_and_rows
    model.zero_grad()
    config = alg.PRESETS["dcpo"]
    tokens = sum(LENGTHS)
    per_response = torch.zeros(len(LENGTHS), dtype=torch.float64)
    for rows in parts:
        batch = collate(rows, prompts, responses, tokenizer.pad_token_id)
        logp, _ = forward_logprobs(model, batch, 1 << 22)
        logp.retain_grad()
        terms = alg.surrogate_loss(config, logp, logp.detach(), torch.ones(len(rows)),
                                   batch.response_mask)
        alg.aggregate_loss(terms.per_token, batch.response_mask, mode, len(LENGTHS), tokens,
                           max(LENGTHS)).backward()
        per_response[rows] = logp.grad.abs().sum(-1).double()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    return (per_response / per_response.sum()).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("parts", [[[0, 1, 2, 3]], [[3], [0, 2], [1]]])
def test_otm_gives_long_responses_their_token_share_through_a_real_backward(model_and_rows,
                                                                            parts):
    got = shares(model_and_rows, "otm", parts)
    assert got == pytest.approx([0.023, 0.068, 0.227, 0.682], abs=5e-4)
    assert got == pytest.approx([n / sum(LENGTHS) for n in LENGTHS], rel=1e-5)
    grpo = shares(model_and_rows, "seq-mean-token-mean", parts)
    assert grpo == pytest.approx([0.25] * 4, rel=1e-5)
