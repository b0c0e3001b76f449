"""The DCPO math (docs/design.md section 1): hand-computed values, properties and equivalences."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcpo_cli.core import algorithms as alg
from dcpo_cli.core.algorithms import PromptStats
from dcpo_cli.errors import DcpoError, FieldError

PRESET_NAMES = list(alg.PRESETS)
SETTINGS = settings(max_examples=40, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def float64():
    """Exact arithmetic for the equivalences; restored so other modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def bounds_at(q: float, config: alg.AlgoConfig) -> tuple[float, float]:
    low, high = alg.ratio_bounds(config, torch.tensor([math.log(q)]))
    return float(low), float(high)


# ---------------------------------------------------------------- clipping bounds


def test_dac_bounds_match_the_design_table():
    low, high = alg.dac_bounds(torch.log(torch.tensor([0.9, 0.01])), 0.16, 0.2, 10.0)
    # q = 0.9: 0.5 + 0.5 sqrt(1 - 0.64/0.9) and 0.5 + 0.5 sqrt(1 + 0.8/0.9)
    assert low[0].item() == pytest.approx(0.5 + 0.5 * math.sqrt(0.26 / 0.9), rel=1e-12)
    assert low[0].item() == pytest.approx(0.76874, abs=1e-5)
    assert high[0].item() == pytest.approx(1.18718, abs=1e-5)
    # q = 0.01: 1 - 64 < 0 gives 0.5; sqrt(1 + 80) = 9 gives 5.
    assert low[1].item() == pytest.approx(0.5, abs=1e-12)
    assert high[1].item() == pytest.approx(5.0, abs=1e-12)


@pytest.mark.parametrize(("preset", "q", "lowest_p", "highest_p"), [
    ("grpo", 0.9, 0.72, 1.08), ("dapo", 0.9, 0.72, 1.152), ("dcpo", 0.9, 0.6919, 1.0685),
    ("grpo", 0.01, 0.008, 0.012), ("dapo", 0.01, 0.008, 0.0128), ("dcpo", 0.01, 0.005, 0.05),
])
def test_probability_bounds_of_the_design_table(preset, q, lowest_p, highest_p):
    low, high = bounds_at(q, alg.PRESETS[preset])
    assert low * q == pytest.approx(lowest_p, abs=1e-4)
    assert high * q == pytest.approx(highest_p, abs=1e-4)


def test_ratio_max_caps_dac_upper_bound():
    _, high = alg.dac_bounds(torch.log(torch.tensor([1e-6])), 0.16, 0.2, 10.0)
    assert high.item() == 10.0
    _, high = alg.dac_bounds(torch.log(torch.tensor([1e-6])), 0.16, 0.2, 1e9)
    assert high.item() == pytest.approx(0.5 + 0.5 * math.sqrt(1 + 0.8e6))


@SETTINGS
@given(q1=st.floats(1e-6, 1.0), q2=st.floats(1e-6, 1.0),
       eps_low=st.floats(0.01, 0.4), eps_high=st.floats(0.01, 0.4))
def test_dac_bounds_contain_one_and_widen_as_q_falls(q1, q2, eps_low, eps_high):
    q_small, q_big = min(q1, q2), max(q1, q2)
    low, high = alg.dac_bounds(torch.log(torch.tensor([q_small, q_big])), eps_low, eps_high,
                               10.0)
    assert 0.5 <= low[0] <= low[1] <= 1.0 <= high[1] <= high[0] <= 10.0


# ---------------------------------------------------------------- surrogate, hand values


def one_token(config, q: float, ratio: float, advantage: float):
    old = torch.tensor([[math.log(q)]])
    logp = (old + math.log(ratio)).requires_grad_()
    terms = alg.surrogate_loss(config, logp, old, torch.tensor([advantage]),
                               torch.ones(1, 1, dtype=torch.bool))
    terms.per_token.sum().backward()
    return terms, float(logp.grad)


def test_surrogate_inside_the_bounds_is_minus_a_r():
    terms, grad = one_token(alg.PRESETS["dcpo"], 0.9, 1.1, 2.0)
    assert terms.per_token.item() == pytest.approx(-2.2)
    assert grad == pytest.approx(-2.2)  # d(-A r)/dlogp = -A r
    assert not terms.clipped.any() and not terms.dual_clipped.any()


def test_surrogate_above_dac_high_bound_with_positive_advantage_is_clipped():
    terms, grad = one_token(alg.PRESETS["dcpo"], 0.9, 1.5, 1.0)
    assert terms.per_token.item() == pytest.approx(-1.18718, abs=1e-5)
    assert grad == 0.0
    assert terms.clipped.item() and terms.clipped_high.item() and not terms.clipped_low.item()


def test_same_ratio_is_inside_dac_for_a_rare_token_but_clipped_by_grpo():
    dcpo, _ = one_token(alg.PRESETS["dcpo"], 0.01, 1.5, 1.0)
    grpo, _ = one_token(alg.PRESETS["grpo"], 0.01, 1.5, 1.0)
    assert not dcpo.clipped.item() and dcpo.per_token.item() == pytest.approx(-1.5)
    assert grpo.clipped.item() and grpo.per_token.item() == pytest.approx(-1.2)


def test_surrogate_below_low_bound_with_negative_advantage_is_clipped_low():
    terms, grad = one_token(alg.PRESETS["dcpo"], 0.9, 0.5, -1.0)
    assert terms.per_token.item() == pytest.approx(0.76874, abs=1e-5)
    assert grad == 0.0
    assert terms.clipped_low.item() and not terms.clipped_high.item()


def test_clipping_never_binds_on_the_side_that_helps():
    # A > 0 and a ratio below the lower bound: max(l1, l2) keeps the unclipped l1.
    terms, grad = one_token(alg.PRESETS["grpo"], 0.5, 0.5, 1.0)
    assert terms.per_token.item() == pytest.approx(-0.5) and grad == pytest.approx(-0.5)
    assert not terms.clipped.item()


def test_dual_clip_caps_negative_advantage_losses_at_c():
    terms, grad = one_token(alg.PRESETS["dcpo"], 0.05, 15.0, -2.0)
    assert terms.per_token.item() == pytest.approx(20.0)  # min(max(30, 2 high), 2 * 10)
    assert grad == 0.0
    assert terms.dual_clipped.item() and not terms.clipped.item()
    off = dataclasses.replace(alg.PRESETS["dcpo"], dual_clip=None)
    terms, grad = one_token(off, 0.05, 15.0, -2.0)
    assert terms.per_token.item() == pytest.approx(30.0) and grad == pytest.approx(30.0)


def test_gspo_uses_one_sequence_ratio_per_response():
    config = alg.PRESETS["gspo"]
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    logp = (old + torch.tensor([[0.1, 0.3, 7.0]])).requires_grad_()
    mask = torch.tensor([[True, True, False]])
    terms = alg.surrogate_loss(config, logp, old, torch.tensor([1.0]), mask)
    s = math.exp((0.1 + 0.3) / 2)  # padding is not part of the mean
    assert terms.ratio[0, :2].tolist() == pytest.approx([s, s])
    assert terms.clipped[0, :2].all()  # s - 1 ~ 0.22 is far above 1 + 4e-4
    assert terms.clipped_low[0, :2].sum() == 0  # A > 0: binds only above the bound
    assert terms.per_token[0, :2].tolist() == pytest.approx([-(1 + 4e-4)] * 2)

    inside = (old + torch.tensor([[1e-4, -1e-4, 0.0]])).requires_grad_()
    terms = alg.surrogate_loss(config, inside, old, torch.tensor([2.0]), mask)
    terms.per_token.sum().backward()
    # Unclipped: each token's gradient is -A s (s = 1 here), the GSPO-token form.
    assert inside.grad[0].tolist() == pytest.approx([-2.0, -2.0, 0.0])


def test_padding_tokens_carry_no_loss():
    old = torch.full((2, 3), -1.0)
    logp = torch.full((2, 3), -0.5)
    mask = torch.tensor([[True, False, False], [True, True, True]])
    terms = alg.surrogate_loss(alg.PRESETS["dcpo"], logp, old, torch.tensor([1.0, -1.0]), mask)
    assert (terms.per_token[~mask] == 0).all() and not terms.clipped[~mask].any()


# ---------------------------------------------------------------- clipped mask vs bounds


def random_batch(seed: int, batch: int = 5, length: int = 7, spread: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen) * 6  # q between e^-6 and 1
    logp = old + torch.randn(batch, length, generator=gen) * spread
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    adv = torch.randn(batch, generator=gen)
    adv[torch.rand(batch, generator=gen) < 0.2] = 0.0
    return logp, old, adv, mask


@SETTINGS
@given(seed=st.integers(0, 10_000), preset=st.sampled_from(PRESET_NAMES),
       spread=st.sampled_from([0.01, 0.3, 2.0]))
def test_clipped_tokens_are_exactly_those_outside_the_binding_bound(seed, preset, spread):
    config = alg.PRESETS[preset]
    logp, old, adv, mask = random_batch(seed, spread=spread)
    terms = alg.surrogate_loss(config, logp, old, adv, mask)
    low, high = alg.ratio_bounds(config, old)
    a = adv[:, None].expand(mask.shape)
    if config.clip == "sequence":
        log_s = ((logp - old) * mask).sum(-1) / mask.sum(-1)
        ratio = log_s.exp()[:, None].expand(mask.shape)
    else:
        ratio = (logp - old).exp()
    above = (a > 0) & (ratio > high) & mask
    below = (a < 0) & (ratio < low) & mask
    assert torch.equal(terms.clipped_high, above)
    assert torch.equal(terms.clipped_low, below)
    assert torch.equal(terms.clipped, above | below)


@SETTINGS
@given(seed=st.integers(0, 10_000), preset=st.sampled_from(PRESET_NAMES))
def test_loss_has_finite_gradient_on_off_policy_batches(seed, preset):
    config = alg.PRESETS[preset]
    logp, old, adv, mask = random_batch(seed, spread=8.0)
    logp = logp.float().requires_grad_()
    terms = alg.surrogate_loss(config, logp, old.float(), adv.float(), mask)
    loss = alg.aggregate_loss(terms.per_token, mask, config.loss_agg, mask.shape[0],
                              int(mask.sum()), mask.shape[1])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()


# ---------------------------------------------------------------- aggregation


def test_aggregation_modes_by_hand():
    per_token = torch.tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 4.0]])
    mask = torch.tensor([[True, False, False], [True, True, True]])

    def agg(mode):
        return alg.aggregate_loss(per_token, mask, mode, 2, 4, 4).item()

    assert agg("otm") == pytest.approx((3 + 6) / 2)  # the paper: no length normalization
    assert agg("seq-mean-token-sum") == pytest.approx((3 + 6) / 2)
    assert agg("seq-mean-token-mean") == pytest.approx((3 + 2) / 2)
    assert agg("token-mean") == pytest.approx(9 / 4)
    assert agg("seq-mean-token-sum-norm") == pytest.approx(9 / (2 * 4))


def gradient_shares(lengths: list[int], mode: str) -> list[float]:
    """Each response's share of the gradient on its log-probs, all advantages equal."""
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, :length] = True
    logp = torch.full(mask.shape, -1.0, dtype=torch.float64, requires_grad=True)
    terms = alg.surrogate_loss(alg.PRESETS["dcpo"], logp, logp.detach(),
                               torch.ones(len(lengths), dtype=torch.float64), mask)
    alg.aggregate_loss(terms.per_token, mask, mode, len(lengths), sum(lengths)).backward()
    per_response = logp.grad.abs().sum(-1)
    return (per_response / per_response.sum()).tolist()


def test_otm_weighs_every_token_by_its_advantage_so_long_responses_get_more_gradient():
    """The issue's worked example: 100/300/1000/3000 tokens, equal advantages."""
    lengths = [100, 300, 1000, 3000]
    assert gradient_shares(lengths, "otm") == pytest.approx([0.023, 0.068, 0.227, 0.682],
                                                            abs=5e-4)
    assert gradient_shares(lengths, "otm") == pytest.approx([n / 4400 for n in lengths])
    assert gradient_shares(lengths, "seq-mean-token-mean") == pytest.approx([0.25] * 4)


def test_seq_mean_token_mean_gives_every_response_the_same_weight_whatever_its_length():
    """One long and one short response with opposite unit losses cancel under GRPO's
    aggregation, but the long one dominates under token-mean and OTM."""
    mask = torch.tensor([[True] + [False] * 9, [True] * 10])
    per_token = torch.where(mask, torch.tensor([[1.0], [-1.0]]), torch.zeros(2, 10))
    assert alg.aggregate_loss(per_token, mask, "seq-mean-token-mean", 2, 11).item() == \
        pytest.approx(0.0)
    assert alg.aggregate_loss(per_token, mask, "token-mean", 2, 11).item() == \
        pytest.approx(-9 / 11)
    assert alg.aggregate_loss(per_token, mask, "otm", 2, 11).item() == pytest.approx(-9 / 2)


@SETTINGS
@given(seed=st.integers(0, 10_000), preset=st.sampled_from(PRESET_NAMES),
       mode=st.sampled_from(alg.LOSS_AGGS), cuts=st.lists(st.integers(1, 7), max_size=4))
def test_any_micro_batch_split_gives_the_same_loss_and_gradient(seed, preset, mode, cuts):
    config = alg.PRESETS[preset]
    logp, old, adv, mask = random_batch(seed, batch=8, length=6, spread=0.5)
    n, tokens, max_len = mask.shape[0], int(mask.sum()), mask.shape[1]

    def loss_and_grad(parts):
        leaf = logp.clone().requires_grad_()
        total = 0.0
        for rows in parts:
            terms = alg.surrogate_loss(config, leaf[rows], old[rows], adv[rows], mask[rows])
            loss = alg.aggregate_loss(terms.per_token, mask[rows], mode, n, tokens, max_len)
            loss.backward()
            total += loss.item()
        return total, leaf.grad

    edges = sorted({0, n, *cuts})
    parts = [list(range(a, b)) for a, b in zip(edges, edges[1:], strict=False)]
    whole_loss, whole_grad = loss_and_grad([list(range(n))])
    split_loss, split_grad = loss_and_grad(parts)
    assert split_loss == pytest.approx(whole_loss, abs=1e-12)
    assert torch.allclose(split_grad, whole_grad, atol=1e-12)


@SETTINGS
@given(seed=st.integers(0, 10_000), preset=st.sampled_from(PRESET_NAMES),
       mode=st.sampled_from(alg.LOSS_AGGS))
def test_zero_advantages_give_zero_loss_and_zero_gradient(seed, preset, mode):
    config = alg.PRESETS[preset]
    logp, old, _, mask = random_batch(seed, spread=3.0)
    logp = logp.requires_grad_()
    terms = alg.surrogate_loss(config, logp, old, torch.zeros(mask.shape[0]), mask)
    loss = alg.aggregate_loss(terms.per_token, mask, mode, mask.shape[0], int(mask.sum()),
                              mask.shape[1])
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logp.grad) == 0
    assert not terms.clipped.any()


# ---------------------------------------------------------------- advantages


def test_grpo_advantages_by_hand():
    adv = alg.grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    std = math.sqrt(1 / 3)  # ddof = 1: sum of squares 1, over 3
    assert adv.tolist() == pytest.approx([0.5 / (std + 1e-6), -0.5 / (std + 1e-6)] * 1
                                         + [-0.5 / (std + 1e-6), 0.5 / (std + 1e-6)])
    assert alg.grpo_advantages(torch.tensor([1.0, 1.0, 1.0])).tolist() == [0.0] * 3
    # Equal fractional rewards: their float mean is off by a rounding residue, yet the
    # advantage (and so the response utilization ratio) must be exactly 0.
    for dtype in (torch.float32, torch.float64):
        assert alg.grpo_advantages(torch.tensor([0.1] * 3, dtype=dtype)).tolist() == [0.0] * 3
    with pytest.raises(DcpoError):
        alg.grpo_advantages(torch.tensor([1.0]))


def test_sas_worked_example_over_three_steps():
    """One prompt over three steps; every figure below is worked out by hand."""
    # Step 1, first visit: t = 1, so A = A_new = A_total = (R - 0.5) / sqrt(1/3).
    adv, stats = alg.sas_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), None)
    a = 0.5 / math.sqrt(1 / 3)
    assert adv.tolist() == pytest.approx([a, -a, -a, a], abs=1e-12)
    assert stats.times == 1 and stats.mean == 0.5
    assert stats.std == pytest.approx(math.sqrt(1 / 3), abs=1e-15)

    # Step 2, all rewards 1 (std_new = 0) but mixed history: t = 2, mean_tot = 0.75,
    # var_tot = (1/3 + 0 + 1/2 * 0.5^2) / 2 = 11/48, A_total = 0.25 / sqrt(11/48), and
    # A = 1/t * A_total for every response.
    adv, stats = alg.sas_advantages(torch.tensor([1.0, 1.0, 1.0, 1.0]), stats)
    a_total = 0.25 / math.sqrt(11 / 48)
    assert adv.tolist() == pytest.approx([a_total / 2] * 4, abs=1e-12)
    assert a_total / 2 == pytest.approx(0.261116, abs=1e-6)
    assert (stats.times, stats.mean) == (2, 0.75)
    assert stats.std == pytest.approx(math.sqrt(11 / 48), abs=1e-15)

    # Step 3, R = [1, 0, 0, 0]: mean_new = 0.25, std_new = 0.5, t = 3, mean_tot = 7/12,
    # var_tot = (2 * 11/48 + 0.25 + 2/3 * 0.5^2) / 3 = 7/24.
    adv, stats = alg.sas_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), stats)
    std_tot = math.sqrt(7 / 24)
    right_new, right_tot = 1.5, (1 - 7 / 12) / std_tot
    wrong_new, wrong_tot = -0.5, -(7 / 12) / std_tot
    # R = 1: SA_new = 2/3*1.5 + 1/3*0.7715 = 1.2572, SA_total = 1/3*1.5 + 2/3*0.7715 = 1.0143
    right = min(2 / 3 * right_new + right_tot / 3, right_new / 3 + 2 / 3 * right_tot, key=abs)
    # R = 0: SA_new = -0.6934, SA_total = -0.8867: the smaller magnitude wins.
    wrong = min(2 / 3 * wrong_new + wrong_tot / 3, wrong_new / 3 + 2 / 3 * wrong_tot, key=abs)
    assert right == pytest.approx(1.014345, abs=1e-6)
    assert wrong == pytest.approx(-0.693374, abs=1e-6)
    assert adv.tolist() == pytest.approx([right, wrong, wrong, wrong], abs=1e-12)
    assert stats.times == 3 and stats.mean == pytest.approx(7 / 12, abs=1e-15)
    assert stats.std == pytest.approx(std_tot, abs=1e-15)


def test_sas_group_with_no_variance_anywhere_gets_zero():
    adv, stats = alg.sas_advantages(torch.tensor([0.0, 0.0]), None)
    assert adv.tolist() == [0.0, 0.0] and stats == PromptStats(1, 0.0, 0.0)
    adv, stats = alg.sas_advantages(torch.tensor([0.0, 0.0]), stats)
    assert adv.tolist() == [0.0, 0.0] and stats == PromptStats(2, 0.0, 0.0)


@SETTINGS
@given(rewards=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0]), min_size=2,
                        max_size=16).filter(lambda r: len(set(r)) > 1))
def test_sas_first_visit_keeps_the_sign_of_reward_minus_group_mean(rewards):
    adv, stats = alg.sas_advantages(torch.tensor(rewards), None)
    mean = sum(rewards) / len(rewards)
    for a, r in zip(adv.tolist(), rewards, strict=True):
        assert math.copysign(1, a) == math.copysign(1, r - mean) or (a == 0 and r == mean)
    assert stats.times == 1 and stats.mean == pytest.approx(mean)


@SETTINGS
@given(history=st.lists(st.lists(st.sampled_from([0.0, 1.0]), min_size=2, max_size=8),
                        min_size=1, max_size=5))
def test_sas_cumulative_statistics_pool_the_groups_as_the_official_rule(history):
    """The update rule is a pooled mean of the group means; the magnitude of every SAS
    advantage never exceeds the larger of |A_new| and |A_total| (it is a convex mix)."""
    stats = None
    for group in history:
        rewards = torch.tensor(group)
        adv, stats = alg.sas_advantages(rewards, stats)
        assert torch.isfinite(adv).all()
    means = [sum(g) / len(g) for g in history]
    assert stats.times == len(history)
    assert stats.mean == pytest.approx(sum(means) / len(means), abs=1e-12)
    assert stats.std >= 0


# ---------------------------------------------------------------- presets and metrics


def test_presets_are_the_design_table():
    dcpo, grpo, dapo, gspo = (alg.PRESETS[n] for n in ("dcpo", "grpo", "dapo", "gspo"))
    assert (dcpo.clip, dcpo.eps_low, dcpo.eps_high, dcpo.ratio_max, dcpo.dual_clip,
            dcpo.advantage, dcpo.loss_agg, dcpo.drop_uniform_groups) == \
        ("dac", 0.16, 0.2, 10.0, 10.0, "sas", "otm", False)
    assert (grpo.clip, grpo.eps_low, grpo.eps_high, grpo.advantage, grpo.loss_agg) == \
        ("fixed", 0.2, 0.2, "grpo", "seq-mean-token-mean")
    assert (dapo.eps_low, dapo.eps_high, dapo.dual_clip, dapo.loss_agg,
            dapo.drop_uniform_groups) == (0.2, 0.28, 10.0, "token-mean", True)
    assert (gspo.clip, gspo.eps_low, gspo.eps_high) == ("sequence", 3e-4, 4e-4)


def test_every_component_is_overridable_on_its_own():
    config = alg.resolve_config("grpo", clip="dac", eps_low=None)
    assert config.clip == "dac" and config.eps_low == 0.2 and config.advantage == "grpo"
    assert alg.resolve_config("dcpo", dual_clip=0).dual_clip is None
    assert alg.resolve_config("dcpo", eps_low=0.2, eps_high=0.28).eps_high == 0.28


@pytest.mark.parametrize(("algo", "overrides", "field", "flagged"), [
    ("ppo", {}, "algo", "unknown --algo 'ppo'; choose one of dcpo, grpo, dapo, gspo"),
    ("dcpo", {"clip": "symmetric"}, "clip", "--clip must be one of"),
    ("dcpo", {"loss_agg": "mean"}, "loss_agg", "--loss-agg must be one of"),
    ("dcpo", {"advantage": "rloo"}, "advantage", "--advantage must be one of"),
    ("grpo", {"eps_low": 1.5}, "eps_low", "--eps-low must be < 1"),
    ("grpo", {"eps_high": -0.1}, "eps_low", "--eps-low and --eps-high must be >= 0"),
    ("dcpo", {"dual_clip": 0.5}, "dual_clip", "--dual-clip must be > 1"),
    ("dcpo", {"ratio_max": 1.0}, "ratio_max", "--ratio-max must be > 1"),
])
def test_bad_configs_are_refused_with_the_field_named(algo, overrides, field, flagged):
    """The presets name the field; the command line words it as its option."""
    with pytest.raises(FieldError) as caught:
        alg.resolve_config(algo, **overrides)
    assert caught.value.field == field and "--" not in str(caught.value)
    assert str(caught.value.as_flags()).startswith(flagged)


def test_an_unknown_override_is_refused_by_name():
    with pytest.raises(DcpoError, match="unknown algorithm option.*temperature"):
        alg.resolve_config("dcpo", temperature=1.0)


def test_step_metrics_by_hand():
    assert alg.nonzero_advantage_ratio([0.0, 1.0, -0.5, 0.0]) == 0.5
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    new = torch.tensor([[-1.5, -1.0, 9.0]])
    mask = torch.tensor([[True, True, False]])
    assert alg.approx_kl_sum(new, old, mask) == pytest.approx(0.5 - 1.0)
    terms = alg.surrogate_loss(alg.PRESETS["grpo"], torch.log(torch.tensor([[1.5, 0.5, 1.0]])),
                               torch.zeros(1, 3), torch.tensor([1.0]),
                               torch.ones(1, 3, dtype=torch.bool))
    counts = alg.clip_counts(terms, torch.tensor([[True, True, False]]))
    assert counts == {"clipped": 1, "clipped_low": 0, "clipped_high": 1, "dual_clipped": 0,
                      "tokens": 2}
    counts = alg.clip_counts(terms, torch.ones(1, 3, dtype=torch.bool))
    fractions = alg.clip_fractions(counts)
    assert fractions["clip_ratio"] == pytest.approx(1 / 3)
    assert fractions["clip_ratio_high"] == pytest.approx(1 / 3)
    assert fractions["clip_ratio_low"] == 0.0


# ---------------------------------------------------------------- KL to the reference


def test_kl_estimators_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.5, -1.0])
    d = logp - ref  # 0, -0.5, 0.5
    assert alg.kl_penalty(logp, ref, "k1").tolist() == pytest.approx([0.0, -0.5, 0.5])
    assert alg.kl_penalty(logp, ref, "k2").tolist() == pytest.approx([0.0, 0.125, 0.125])
    k3 = [math.exp(-x) + x - 1 for x in d.tolist()]  # exp(ref - logp) - (ref - logp) - 1
    assert alg.kl_penalty(logp, ref, "low_var_kl").tolist() == pytest.approx(k3)
    assert k3[1] == pytest.approx(math.exp(0.5) - 0.5 - 1)


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_low_var_kl_is_nonnegative_bounded_and_zero_only_at_the_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(64, generator=gen, dtype=torch.float64) * 30
    ref = -torch.rand(64, generator=gen, dtype=torch.float64) * 30
    kl = alg.kl_penalty(logp, ref, "low_var_kl")
    assert (kl >= 0).all() and (kl <= 10).all()
    assert torch.equal(alg.kl_penalty(logp, logp, "low_var_kl"), torch.zeros(64,
                                                                               dtype=kl.dtype))
    assert ((kl > 0) == (logp != ref)).all()
