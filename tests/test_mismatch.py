"""Sampler–trainer mismatch metrics and correction weights, checked against hand-computed
values (mismatch.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dcpo_cli.core import algorithms
from dcpo_cli.core.mismatch import (
    add_sums,
    correction_weights,
    mismatch_metrics,
    mismatch_sums,
    resolve_correction,
    response_mean_weights,
)

# Two responses, the second one token shorter (its last slot is padding). The trainer's old
# log-probs and per-token ratios rho = pi_old / pi_sampler chosen by hand:
#   response 0: rho = 1.25, 1, 3      response 1: rho = 0.25, 1, (pad)
OLD = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.9)],
                    [math.log(0.15), math.log(0.3), 0.0]])
SAMPLER = torch.tensor([[math.log(0.4), math.log(0.2), math.log(0.3)],
                        [math.log(0.6), math.log(0.3), -7.0]])  # padding holds junk
MASK = torch.tensor([[True, True, True], [True, True, False]])


def assert_close(tensor: torch.Tensor, expected: list[list[float]]) -> None:
    torch.testing.assert_close(tensor, torch.tensor(expected), rtol=0, atol=1e-6)


def test_metrics_by_hand():
    metrics = mismatch_metrics(mismatch_sums(OLD, SAMPLER, MASK))
    # k3 = rho - 1 - ln rho per token, averaged over the 5 response tokens
    k3 = [0.25 - math.log(1.25), 0.0, 2 - math.log(3), -0.75 - math.log(0.25), 0.0]
    assert metrics["mismatch_kl"] == pytest.approx(sum(k3) / 5, abs=1e-6)
    assert metrics["mismatch_kl"] == pytest.approx(0.3129077, abs=1e-6)
    # |ln rho|: ln 1.25 + ln 3 + ln 4, over 5 tokens
    assert metrics["mismatch_logprob_diff"] == pytest.approx(
        (math.log(1.25) + math.log(3) + math.log(4)) / 5, abs=1e-6)
    # rho = 3 and rho = 0.25 fall outside [0.5, 2]
    assert metrics["mismatch_outside_ratio"] == pytest.approx(2 / 5)


def test_sums_accumulate_across_micro_batches():
    whole = mismatch_sums(OLD, SAMPLER, MASK)
    parts = add_sums(mismatch_sums(OLD[:1], SAMPLER[:1], MASK[:1]),
                     mismatch_sums(OLD[1:], SAMPLER[1:], MASK[1:]))
    assert parts == pytest.approx(whole)
    assert mismatch_metrics({}) == {"mismatch_kl": None, "mismatch_logprob_diff": None,
                                    "mismatch_outside_ratio": None}


def test_tis_weights_by_hand():
    weights = correction_weights(OLD, SAMPLER, MASK, "tis", cap=2.0)
    assert_close(weights, [[1.25, 1.0, 2.0], [0.25, 1.0, 0.0]])
    means = response_mean_weights(weights, MASK)
    assert means.tolist() == pytest.approx([4.25 / 3, 0.625], abs=1e-6)


def test_mask_weights_by_hand():
    weights = correction_weights(OLD, SAMPLER, MASK, "mask", cap=2.0)
    # rho = 3 is beyond the cap: that token drops out; the others keep their ratio
    assert_close(weights, [[1.25, 1.0, 0.0], [0.25, 1.0, 0.0]])
    assert response_mean_weights(weights, MASK).tolist() == pytest.approx([0.75, 0.625],
                                                                          abs=1e-6)


def test_no_correction_is_the_mask():
    assert correction_weights(OLD, SAMPLER, MASK, "none", 2.0).tolist() == \
        [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def test_bad_mode_and_cap():
    with pytest.raises(ValueError, match="unknown correction"):
        correction_weights(OLD, SAMPLER, MASK, "seq", 2.0)
    with pytest.raises(ValueError, match="cap"):
        correction_weights(OLD, SAMPLER, MASK, "tis", 0.0)


def test_weighted_loss_and_gradient_by_hand():
    """The first update of a step (new = old, ratio 1) with token-mean aggregation: each
    token's loss is -A, times its TIS weight. Advantages +1 and -0.5:
      sum = -(1.25 + 1 + 2) + 0.5 (0.25 + 1) = -3.625 over 5 tokens = -0.725.
    The weights are constants: d loss / d logp_t = -A w_t / 5."""
    config = algorithms.PRESETS["dapo"]  # fixed clipping, token-mean
    logp = OLD.clone().requires_grad_(True)
    advantages = torch.tensor([1.0, -0.5])
    weights = correction_weights(OLD, SAMPLER, MASK, "tis", cap=2.0)
    terms = algorithms.surrogate_loss(config, logp, OLD, advantages, MASK)
    loss = algorithms.aggregate_loss(terms.per_token * weights, MASK, config.loss_agg,
                                     num_responses=2, num_tokens=5)
    assert loss.item() == pytest.approx(-0.725, abs=1e-6)
    loss.backward()
    expected = [[-1.25 / 5, -1 / 5, -2 / 5], [0.5 * 0.25 / 5, 0.5 / 5, 0.0]]
    assert_close(logp.grad, expected)


def test_auto_is_none_on_policy_and_tis_on_stale_rollouts():
    assert resolve_correction("auto", 0) == "none"
    assert resolve_correction("auto", None) == "none"  # files that do not record the policy
    assert resolve_correction("auto", 1) == resolve_correction("auto", 3) == "tis"
    for mode in ("none", "tis", "mask"):  # an explicit choice is kept at every staleness
        assert resolve_correction(mode, 0) == resolve_correction(mode, 2) == mode


def test_decoupled_objective_on_stale_rollouts_by_hand():
    """Staleness 1 under --rollout-correction auto (docs/design.md 1.4c): the ratio and the
    DAC bounds are of pi_theta / pi_old, the weight min(pi_old / mu, 2) moves mu's samples
    to pi_old. Two tokens of one response, A = +1, DCPO's eps_high 0.2:
      token 0: mu 0.2, pi_old 0.5, pi_theta 0.6: w = min(2.5, 2) = 2; r = 1.2 is inside
               high(0.5) = 0.5 + 0.5 sqrt(2.6) = 1.30623: loss -2 * 1.2 = -2.4,
               d loss / d logp = -w r = -2.4.
      token 1: mu 0.1, pi_old 0.4, pi_theta 0.7: w = min(4, 2) = 2; r = 1.75 is above
               high(0.4) = 0.5 + 0.5 sqrt(3) = 1.36603 (bounds from mu, high(0.1) = 2,
               would not clip it): loss -2 * 1.36603 = -2.73205, gradient 0."""
    config = algorithms.PRESETS["dcpo"]
    old = torch.tensor([[math.log(0.5), math.log(0.4)]])
    mu = torch.tensor([[math.log(0.2), math.log(0.1)]])
    logp = torch.tensor([[math.log(0.6), math.log(0.7)]], requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    weights = correction_weights(old, mu, mask, resolve_correction("auto", 1), cap=2.0)
    assert_close(weights, [[2.0, 2.0]])
    terms = algorithms.surrogate_loss(config, logp, old, torch.tensor([1.0]), mask)
    per_token = terms.per_token * weights
    high_1 = 0.5 + 0.5 * math.sqrt(3.0)
    assert_close(per_token.detach(), [[-2.4, -2 * high_1]])
    assert terms.clipped.tolist() == [[False, True]]
    per_token.sum().backward()
    assert_close(logp.grad, [[-2.4, 0.0]])


finite_logprobs = st.lists(st.floats(-30.0, 0.0), min_size=1, max_size=12)


@given(finite_logprobs, st.data(), st.floats(1.01, 10.0))
def test_properties(old, data, cap):
    sampler = data.draw(st.lists(st.floats(-30.0, 0.0), min_size=len(old), max_size=len(old)))
    old_t, sampler_t = torch.tensor([old]), torch.tensor([sampler])
    mask = torch.ones_like(old_t, dtype=torch.bool)
    metrics = mismatch_metrics(mismatch_sums(old_t, sampler_t, mask))
    assert metrics["mismatch_kl"] >= -1e-6  # k3 is never negative
    assert 0.0 <= metrics["mismatch_outside_ratio"] <= 1.0
    tis = correction_weights(old_t, sampler_t, mask, "tis", cap)
    masked = correction_weights(old_t, sampler_t, mask, "mask", cap)
    assert bool((tis >= 0).all() and (tis <= cap + 1e-6).all())
    # masking keeps exactly the tokens truncation leaves alone, with the same weight
    kept = masked > 0
    assert torch.allclose(masked[kept], tis[kept])
    assert bool((tis[~kept] >= cap * (1 - 1e-5)).all())
    # a sampler that agrees with the trainer: no mismatch, every weight 1
    same = mismatch_metrics(mismatch_sums(old_t, old_t, mask))
    assert same == {"mismatch_kl": 0.0, "mismatch_logprob_diff": 0.0,
                    "mismatch_outside_ratio": 0.0}
    assert correction_weights(old_t, old_t, mask, "tis", cap).tolist() == [[1.0] * len(old)]
