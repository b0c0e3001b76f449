"""The evaluation metrics of docs/design.md 1.8, as pure functions over per-sample verdicts.

- avg@1: accuracy of the one greedy response per problem;
- avg@k: mean accuracy over all k*P sampled responses;
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) per problem (n samples, c correct),
  averaged over problems;
- maj@k: a problem counts as solved when the most frequent extracted answer among its
  samples is correct.

Majority-vote rule (deterministic): answers are grouped by `normalize_answer`; the group with
the most votes wins; a tie goes to the group whose first member came first (lowest sample
index). A sample with no extracted answer never wins while any sample has one; when no sample
has an answer the problem counts as wrong. A group is correct when its first member is
(members share one normalized answer, so the verifier agrees on them in practice).
All percentages are in [0, 100].
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One verified response: what the verifier read from it and whether that was right."""

    extracted: str | None
    correct: bool


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k draws (without replacement) from n samples, c of
    them correct, is correct: 1 - C(n-c, k) / C(n, k), computed exactly on integers."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


_SPACES = re.compile(r"\s+|\\[,;:! ]|\\quad|\\qquad")
_WRAPPERS = ("\\left", "\\right", "\\displaystyle", "$")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def normalize_answer(answer: str | None) -> str:
    """A canonical string for grouping votes: spacing, $...$, \\left/\\right, \\dfrac and
    trailing periods are ignored, and numbers are written canonically ("027", "27.0" -> "27").
    Returns "" for a missing answer."""
    if answer is None:
        return ""
    text = _TEXT.sub(r"\1", answer)
    text = _SPACES.sub("", text)
    for wrapper in _WRAPPERS:
        text = text.replace(wrapper, "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")
    number = text.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text) else text
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)", number):
        value = float(number)
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    return text


def majority_correct(samples: Sequence[Sample]) -> bool:
    """Whether the majority-vote answer of one problem's samples is correct (rule above)."""
    votes: dict[str, list[Sample]] = {}  # insertion order = first appearance
    for sample in samples:
        votes.setdefault(normalize_answer(sample.extracted), []).append(sample)
    candidates = {key: group for key, group in votes.items() if key}
    if not candidates:
        return False
    # max() keeps the first maximal item, and dicts iterate in first-appearance order
    winner = max(candidates.values(), key=len)
    return bool(winner[0].correct)


def percent(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def benchmark_metrics(greedy: Sequence[Sample] | None,
                      sampled: Sequence[Sequence[Sample]] | None,
                      pass_ks: Sequence[int] = ()) -> dict[str, float | int]:
    """Metrics of one benchmark, in percent.

    `greedy`: one sample per problem (or None when greedy decoding was skipped);
    `sampled`: per problem, its k samples (or None). pass@k is reported for k = the number
    of samples and for every extra k in `pass_ks`.
    """
    problems = len(greedy) if greedy is not None else len(sampled or [])
    metrics: dict[str, float | int] = {"problems": problems}
    if greedy is not None:
        metrics["avg@1"] = percent([s.correct for s in greedy])
    if sampled:
        k = len(sampled[0])
        if any(len(group) != k for group in sampled):
            raise ValueError("every problem needs the same number of samples")
        if k:
            metrics[f"avg@{k}"] = percent([s.correct for group in sampled for s in group])
            for kk in sorted({k, *pass_ks}):
                metrics[f"pass@{kk}"] = percent(
                    [pass_at_k(k, sum(s.correct for s in group), kk) for group in sampled])
            metrics[f"maj@{k}"] = percent([majority_correct(group) for group in sampled])
    return metrics


def average_metrics(per_benchmark: dict[str, dict[str, float | int]]) -> dict[str, float | int]:
    """The unweighted mean of each metric over the benchmarks that report it (as the paper's
    average columns do); `problems` is the total."""
    result: dict[str, float | int] = {
        "problems": sum(int(m["problems"]) for m in per_benchmark.values())}
    keys: list[str] = []
    for metrics in per_benchmark.values():
        keys += [key for key in metrics if key != "problems" and key not in keys]
    for key in keys:
        values = [float(m[key]) for m in per_benchmark.values() if key in m]
        result[key] = sum(values) / len(values)
    return result
