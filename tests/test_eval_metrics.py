"""The evaluation metrics: pass@k against brute force, majority-vote ties, hand-computed sets."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcpo_cli.evaluate.metrics import (
    Sample,
    average_metrics,
    benchmark_metrics,
    majority_correct,
    normalize_answer,
    pass_at_k,
)


@st.composite
def n_c_k(draw):
    n = draw(st.integers(1, 10))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@settings(max_examples=60, deadline=None)
@given(n_c_k())
def test_pass_at_k_matches_enumeration_of_subsets(nck):
    n, c, k = nck
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(outcomes[i] for i in subset) for subset in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 3 of the 6 pairs hold the right one
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 is plain accuracy
    assert pass_at_k(3, 0, 3) == 0.0
    assert pass_at_k(3, 1, 3) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def s(answer, correct=False):
    return Sample(answer, correct)


def test_majority_plain_and_normalized_grouping():
    # "27.0", "027" and "$27$" are one answer with three votes against two for 5
    assert majority_correct([s("5"), s("27.0", True), s("027", True), s("5"), s("$27$", True)])
    assert not majority_correct([s("5"), s("5"), s("27", True)])


def test_majority_ties_go_to_the_first_answer_seen():
    assert majority_correct([s("1", True), s("2"), s("2"), s("1", True)])
    assert not majority_correct([s("2"), s("1", True), s("1", True), s("2")])


def test_majority_never_picks_an_empty_extraction():
    assert majority_correct([s(None), s(None), s(""), s("7", True)])
    assert not majority_correct([s(None), s(None)])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["1", "2", "3", None]), min_size=1, max_size=8),
       st.sampled_from(["1", "2", "3"]))
def test_majority_agrees_with_counting(answers, gold):
    samples = [Sample(a, a == gold) for a in answers]
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        assert not majority_correct(samples)
        return
    top = max(counts.values())
    first_top = next(a for a in answers if a is not None and counts[a] == top)
    assert majority_correct(samples) == (first_top == gold)
    # deterministic: the same input always gives the same answer
    assert majority_correct(samples) == majority_correct(list(samples))


@pytest.mark.parametrize(("raw", "norm"), [
    ("027", "27"), ("27.0", "27"), (" $27$ ", "27"), ("1,000", "1000"), ("0.50", "0.5"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\left( 3, \\pi \\right)", "(3,\\pi)"),
    ("10\\text{ cm}", "10cm"), (None, ""), ("x+1.", "x+1"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_benchmark_metrics_hand_computed():
    greedy = [s("1", True), s("9"), s("3", True)]
    sampled = [
        [s("1", True), s("1", True), s("2"), s("2")],  # 2/4 right, tie -> "1" wins
        [s("8"), s("8"), s("9"), s("9")],  # none right
        [s("3", True), s("4"), s("4"), s(None)],  # 1/4 right, "4" wins
    ]
    m = benchmark_metrics(greedy, sampled, pass_ks=[1, 2])
    assert m["problems"] == 3
    assert m["avg@1"] == pytest.approx(200 / 3)
    assert m["avg@4"] == pytest.approx(100 * 3 / 12)
    assert m["pass@4"] == pytest.approx(100 * 2 / 3)
    assert m["pass@1"] == pytest.approx(m["avg@4"])  # pass@1 equals sampled accuracy
    # pass@2: 1 - C(2,2)/C(4,2) = 5/6 ; 0 ; 1 - C(3,2)/C(4,2) = 1/2
    assert m["pass@2"] == pytest.approx(100 * (5 / 6 + 0 + 0.5) / 3)
    assert m["maj@4"] == pytest.approx(100 / 3)


def test_benchmark_metrics_greedy_only_and_sampled_only():
    assert benchmark_metrics([s("1", True), s("2")], None) == {"problems": 2, "avg@1": 50.0}
    m = benchmark_metrics(None, [[s("1", True), s("2")]])
    assert set(m) == {"problems", "avg@2", "pass@2", "maj@2"}
    assert m["problems"] == 1 and m["pass@2"] == 100.0 and m["maj@2"] == 100.0


def test_average_is_unweighted_mean_and_total_problems():
    avg = average_metrics({"a": {"problems": 30, "avg@1": 10.0, "avg@2": 20.0},
                           "b": {"problems": 500, "avg@1": 50.0, "avg@2": 40.0}})
    assert avg == {"problems": 530, "avg@1": 30.0, "avg@2": 30.0}
