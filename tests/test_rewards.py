"""rewards: boxed extraction, the default reward (math-verify) and the killable pool that
every reward runs in, overlong shaping."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcpo_cli.errors import DcpoError
from dcpo_cli.rewards import (
    Verdict,
    call_reward,
    extract_boxed,
    load_reward_function,
    math_verify,
    overlong_penalty,
    verify_batch,
)
from dcpo_cli.rewards.pool import JobOutcome, run_jobs


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize(("text", "expected"), [
    ("so the answer is $\\boxed{42}$.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("nested \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)} end",
     "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\fbox{7}", "7"),
    ("$\\boxed 5$", "5"),
    ("no box here", None),
    ("\\boxed{unclosed {", None),
    ("\\boxed{}", ""),
])
def test_extract_boxed_cases(text, expected):
    assert extract_boxed(text) == expected


_plain = st.text(alphabet=st.characters(blacklist_characters="{}\\",
                                        blacklist_categories=("Cs",)), max_size=12)
_balanced = st.recursive(_plain, lambda inner: st.builds(lambda a, b, c: f"{a}{{{b}}}{c}",
                                                          _plain, inner, _plain), max_leaves=6)


@settings(max_examples=50, deadline=None)
@given(before=_plain, content=_balanced, after=_plain)
def test_extract_boxed_returns_the_last_box_content(before, content, after):
    assert extract_boxed(f"{before}\\boxed{{x}} {before}\\boxed{{{content}}}{after}") == content


@pytest.mark.slow
def test_math500_reference_solutions_all_verify(benchmarks):
    rows = _jsonl(benchmarks / "math500.jsonl")
    verdicts = verify_batch([r["solution"] for r in rows], [r["answer"] for r in rows])
    assert len(verdicts) == 500
    wrong = [(r["answer"], v) for r, v in zip(rows, verdicts, strict=True) if not v.correct]
    assert wrong == []
    assert not any(v.timed_out or v.error for v in verdicts)


@pytest.mark.slow
def test_math500_solutions_never_match_another_problems_answer(benchmarks):
    rows = _jsonl(benchmarks / "math500.jsonl")
    answers = [r["answer"] for r in rows]
    shifted = answers[1:] + answers[:1]
    pairs = [i for i in range(len(rows)) if answers[i] != shifted[i]]
    verdicts = verify_batch([rows[i]["solution"] for i in pairs], [shifted[i] for i in pairs])
    matched = [i for i, v in zip(pairs, verdicts, strict=True) if v.correct]
    # A match is only allowed where the two gold answers are one answer written two ways
    # (`5` and `x=5` in this data), as math-verify itself judges them.
    same = verify_batch([f"\\boxed{{{answers[i]}}}" for i in matched],
                        [shifted[i] for i in matched])
    assert all(v.correct for v in same), [(answers[i], shifted[i]) for i in matched]
    assert len(matched) <= 2


def test_amc_float_answers_and_aime_leading_zeros_match_integers(benchmarks):
    amc = _jsonl(benchmarks / "amc23.jsonl")
    answers = [str(r["answer"]) for r in amc]  # written like 27.0
    assert "27.0" in answers
    responses = [f"The answer is \\boxed{{{float(a):g}}}." for a in answers]
    assert all(v.correct for v in verify_batch(responses, answers))
    verdicts = verify_batch(["\\boxed{23}", "\\boxed{27}", "\\boxed{24}"], ["023", "27.0", "023"])
    assert [v.correct for v in verdicts] == [True, True, False]


def test_power_tower_times_out_with_a_flag_and_the_batch_still_finishes():
    """The tower never finishes, so any deadline flags it; the others take milliseconds of
    their own (the deadline counts from a ready worker, not from the pool's start), so
    2 s holds on a busy machine too. No wall-clock bound on the whole batch: that the call
    returns, with the tower flagged, is what shows it was not waited for."""
    verdicts = verify_batch(["\\boxed{9^{9^{9^{9^{9}}}}}", "\\boxed{4}", "no box", "\\boxed{5}"],
                            ["3", "4", "4", "4"], workers=2, timeout=2.0)
    assert verdicts[0] == Verdict(False, "9^{9^{9^{9^{9}}}}", timed_out=True, error=False)
    assert verdicts[1] == Verdict(True, "4")
    assert verdicts[2] == Verdict(False, None)
    assert verdicts[3] == Verdict(False, "5")


def test_verify_batch_reports_progress_for_every_response():
    seen = []
    verify_batch(["\\boxed{1}", "none", "\\boxed{2}"], ["1", "1", "1"], on_progress=seen.append)
    assert sum(seen) == 3
    assert verify_batch([], []) == []


@pytest.mark.parametrize(("text", "answer", "level"), [
    ("so \\boxed{\\frac{1}{2}}", "0.5", "correct"),
    ("\\boxed{3}", "4", "wrong"),
    ("\\boxed{}", "4", "no_answer"),
    ("the answer is 4", "4", "no_answer"),
])
def test_the_default_reward_returns_levels(text, answer, level):
    assert math_verify(text, answer, {}) == level
    assert call_reward("dcpo_cli.rewards:math_verify", text, answer, {}) == level


def test_call_reward_takes_numbers_and_level_names_only(tmp_path, monkeypatch):
    (tmp_path / "echo_reward.py").write_text("def echo(response_text, answer, row):\n"
                                             "    return row['value']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert call_reward("echo_reward:echo", "", "", {"value": 2}) == 2.0
    assert isinstance(call_reward("echo_reward:echo", "", "", {"value": True}), float)
    assert call_reward("echo_reward:echo", "", "", {"value": "wrong"}) == "wrong"
    with pytest.raises(ValueError, match="'maybe'"):
        call_reward("echo_reward:echo", "", "", {"value": "maybe"})


def test_the_pool_kills_an_overrunning_job_and_reports_a_raising_one():
    # sleep(600) flagged as timed out: it was killed (had the pool waited, it would have
    # finished, unflagged); no wall-clock bound needed.
    outcomes = run_jobs(time.sleep, {0: (600,), 1: (0,), 2: (0,)}, workers=2, timeout=1.0)
    assert outcomes[0] == JobOutcome(None, timed_out=True)
    assert outcomes[1] == outcomes[2] == JobOutcome(None)  # time.sleep returns None
    failed = run_jobs(load_reward_function, {0: ("nocolon",)}, workers=1, timeout=5.0)
    assert "package.module:function" in failed[0].error and not failed[0].timed_out


def test_the_pool_fork_server_is_warmed_by_a_throw_away_check():
    """The fork server preloads dcpo_cli.rewards.warmup, whose import runs one full check (so every
    worker forked from the server starts with math-verify's parsers built)."""
    import subprocess
    import sys

    from dcpo_cli.rewards.pool import FORKSERVER_PRELOAD

    assert "dcpo_cli.rewards.warmup" in FORKSERVER_PRELOAD
    code = ("import dcpo_cli.rewards.warmup as w; from dcpo_cli.rewards import _parse_gold; "
            "print(w.WARMED, _parse_gold.cache_info().currsize)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["True", "1"]


@pytest.mark.parametrize(("length", "expected"), [
    (0, 0.0), (12, 0.0), (13, -0.25), (14, -0.5), (16, -1.0), (17, -1.0), (100, -1.0),
])
def test_overlong_penalty_hand_values(length, expected):
    # L_max 16, buffer 4: free up to 12, then a ramp reaching -1 at 16, -1 beyond
    assert overlong_penalty(length, 16, 4) == pytest.approx(expected)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 300), st.integers(0, 300), st.integers(1, 200), st.integers(0, 100))
def test_overlong_penalty_is_a_bounded_nonincreasing_ramp(a, b, max_length, buffer):
    short, long = sorted((a, b))
    assert -1.0 <= overlong_penalty(long, max_length, buffer) <= 0.0
    assert overlong_penalty(long, max_length, buffer) <= overlong_penalty(short, max_length,
                                                                           buffer)
    assert overlong_penalty(long, max_length, 0) == 0.0


def test_load_reward_function_errors():
    assert load_reward_function("json:dumps") is json.dumps
    for spec, fragment in [("nocolon", "package.module:function"),
                           ("no_such_module_xyz:f", "cannot import"),
                           ("json:no_such_function", "has no function")]:
        with pytest.raises(DcpoError, match=fragment):
            load_reward_function(spec)


def slow_start_then_identity(value):
    return value


def test_a_workers_start_is_not_charged_to_its_job(monkeypatch):
    """A worker that takes longer to start than the deadline (a busy machine, the fork
    server's first start) still runs its job in full: the deadline counts from ready."""
    from dcpo_cli.rewards import pool

    real = pool._worker_main

    def late_ready(conn, function):
        time.sleep(2.0)  # starting, slower than the 1 s deadline below
        real(conn, function)

    monkeypatch.setattr(pool, "_worker_main", late_ready)
    monkeypatch.setattr(pool, "_context", lambda: __import__("multiprocessing").get_context(
        "fork"))
    outcomes = run_jobs(slow_start_then_identity, {0: (7,), 1: (8,)}, workers=2, timeout=1.0)
    assert outcomes == {0: JobOutcome(7), 1: JobOutcome(8)}
