"""Rewards: the reward-function interface, its default (math-verify on the last
`\\boxed{}`), and DAPO's overlong shaping.

A reward function is `f(response_text, answer, row) -> float | str`, named on the command
line as `package.module:function` (`dcpo score --reward`). It returns either a number, the
reward itself, or the name of a level ("correct", "wrong", "no_answer": docs/design.md 1.4),
which `dcpo score` turns into 1 / --wrong-reward / --no-answer-reward. The default,
`dcpo_cli.rewards:math_verify` (options.DEFAULT_REWARD), returns levels. `row` holds the
response's columns except the per-token lists, plus `response_length` in tokens.

`judge` is the one path every reward takes (score, eval, the tiny model's summary): each
call runs in pool.py's worker processes under a deadline, so neither a slow sympy
comparison nor a user's hanging function can stall a stage.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dcpo_cli.errors import DcpoError
from dcpo_cli.options import DEFAULT_REWARD, REWARD_LEVELS

_BOX_COMMANDS = ("\\boxed", "\\fbox")


@dataclass(frozen=True)
class Judgement:
    """What a reward function gave one response: a float or a level name (None when it
    timed out or raised)."""

    value: float | str | None
    timed_out: bool = False
    error: str | None = None  # the exception, on one line


@dataclass(frozen=True)
class Verdict:
    """math-verify's judgement of one response, as eval and the tiny model read it."""

    correct: bool
    extracted: str | None
    timed_out: bool = False
    error: bool = False


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced.

    `\\boxed 5` (no braces) yields the token after the space. None when there is no box or
    the last one is never closed.
    """
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    rest = text[start:]
    rest = rest[len("\\boxed"):] if rest.startswith("\\boxed") else rest[len("\\fbox"):]
    if rest.startswith(" "):
        token = rest[1:].split("$")[0].split()
        return token[0] if token else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for index, char in enumerate(rest):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:index]
    return None


@functools.lru_cache(maxsize=4096)  # a prompt's G responses share one gold answer
def _parse_gold(answer: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    answer = answer.strip()
    # Wrapped in $...$ so plain numbers ("023", "27.0") and LaTeX ("\frac{1}{2}") both parse.
    gold = parse(f"${answer}$", configs, parsing_timeout=None)
    return tuple(gold or parse(answer, configs, parsing_timeout=None))


def check_answer(boxed: str, answer: str) -> bool:
    """math-verify equivalence of a box's content and a gold answer (no timeout: see module)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold = _parse_gold(answer)
    pred = parse(f"$\\boxed{{{boxed}}}$", [LatexExtractionConfig(boxed_match_priority=0),
                                          ExprExtractionConfig()], parsing_timeout=None)
    if not gold or not pred:
        return False
    return bool(verify(list(gold), pred, timeout_seconds=None))


def math_verify(response_text: str, answer: str, row: dict | None = None) -> str:
    """The default reward: the level of the response's last `\\boxed{}` answer, compared
    with the gold answer by math-verify ("no_answer" without a non-empty box)."""
    box = extract_boxed(response_text)
    if not (box or "").strip():
        return "no_answer"
    return "correct" if check_answer(box, answer) else "wrong"


def call_reward(spec: str, response_text: str, answer: str, row: dict) -> float | str:
    """One reward call, as a worker makes it: a level name or a float, else an error."""
    value = _reward_function(spec)(response_text, answer, row)
    if isinstance(value, str):
        if value not in REWARD_LEVELS:
            raise ValueError(f"returned {value!r}: a reward is a number or one of the levels "
                             f"{', '.join(REWARD_LEVELS)}")
        return value
    return float(value)


@functools.lru_cache(maxsize=8)  # a worker imports the function once, not per response
def _reward_function(spec: str) -> Callable[..., Any]:
    return load_reward_function(spec)


def judge(spec: str, responses: Sequence[str], answers: Sequence[str],
          rows: Sequence[dict] | None = None, *, workers: int | None = None,
          timeout: float = 5.0,
          on_progress: Callable[[int], None] | None = None) -> list[Judgement]:
    """The reward function `spec` on every (response, gold answer, row), in the killable pool;
    never longer than `timeout` seconds per response. `on_progress(k)`: k more are done."""
    from dcpo_cli.rewards.pool import run_jobs

    if len(responses) != len(answers) or (rows is not None and len(rows) != len(answers)):
        raise ValueError("responses, answers and rows differ in length")
    jobs = {i: (spec, text, answers[i], rows[i] if rows is not None else {})
            for i, text in enumerate(responses)}
    outcomes = run_jobs(call_reward, jobs, workers, timeout, on_progress)
    return [Judgement(o.value, o.timed_out, o.error) for o in (outcomes[i] for i in jobs)]


def verify_batch(responses: Sequence[str], answers: Sequence[str], workers: int | None = None,
                 timeout: float = 5.0,
                 on_progress: Callable[[int], None] | None = None) -> list[Verdict]:
    """math-verify's verdict on each (response, gold answer) pair: `judge` with the default
    reward. A timed-out or crashed check is wrong, with its flag set."""
    judgements = judge(DEFAULT_REWARD, responses, answers, workers=workers, timeout=timeout,
                       on_progress=on_progress)
    return [Verdict(j.value == "correct", extract_boxed(text), j.timed_out, j.error is not None)
            for text, j in zip(responses, judgements, strict=True)]


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's overlong reward shaping (docs/design.md 1.5): 0, a linear ramp to -1, then -1."""
    if buffer <= 0:
        return 0.0
    soft_limit = max_length - buffer
    if length <= soft_limit:
        return 0.0
    if length <= max_length:
        return (soft_limit - length) / buffer
    return -1.0


def load_reward_function(spec: str) -> Callable[[str, str, dict], float]:
    """Import a user reward `package.module:function` taking (response_text, answer, row)."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise DcpoError(f"--reward {spec!r}: expected the form package.module:function")
    if os.getcwd() not in sys.path:  # a module beside the user, as `python -m` would find it
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise DcpoError(f"--reward {spec!r}: cannot import {module_name} "
                        f"({type(exc).__name__}: {exc})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise DcpoError(f"--reward {spec!r}: {module_name} has no function {function_name}")
    return function
