"""Rewards: math-verify answer checking and user rewards in a killable process pool, overlong
shaping.

`verify_batch` compares each gold answer with the last `\\boxed{...}` of its response. Every
check runs in a worker process with a hard deadline: math-verify's own timeout relies on
SIGALRM (main thread only, and useless inside a long C-level sympy call), so a worker that
overruns is killed and replaced, and its response is scored wrong with `timed_out=True`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from dcpo_cli.errors import DcpoError

_BOX_COMMANDS = ("\\boxed", "\\fbox")


@dataclass(frozen=True)
class Verdict:
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


def _run_job(job: tuple) -> Any:
    """What a worker computes: ("verify", boxed, answer) -> bool, or
    ("user", spec, response_text, answer, row) -> float."""
    kind, *args = job
    if kind == "verify":
        return check_answer(*args)
    spec, text, answer, row = args
    return float(load_reward_function(spec)(text, answer, row))


def _worker_main(conn) -> None:
    """Answer (index, job) requests until told to stop (None) or killed."""
    # math-verify warns that its own timeouts are off: deliberate, the parent enforces them.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, job = message
        try:
            result = (index, _run_job(job), None)
        except Exception as exc:  # reported to the parent, which decides what it means
            result = (index, None, f"{type(exc).__name__}: {exc}")
        conn.send(result)


# What the pool's fork server imports once; verifier_warmup also runs one check there.
FORKSERVER_PRELOAD = ["math_verify", "dcpo_cli.rewards", "dcpo_cli.verifier_warmup"]


def _context():
    # forkserver: cheap forks of a clean process that has math_verify preloaded (and warmed),
    # and safe even when the caller has torch threads running (plain fork is not).
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


class _Worker:
    def __init__(self, ctx) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.index: int | None = None
        self.deadline = 0.0

    def submit(self, index: int, job: tuple, timeout: float) -> None:
        self.index, self.deadline = index, time.monotonic() + timeout
        self.conn.send((index, job))

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(timeout=1.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class JobOutcome:
    value: Any = None  # the job's result, when it finished
    timed_out: bool = False
    error: str | None = None  # the exception it raised, or "the worker died"


def run_jobs(jobs: dict[int, tuple], workers: int | None, timeout: float,
             on_progress: Callable[[int], None] | None = None) -> dict[int, JobOutcome]:
    """Run each job in a pool of worker processes, none longer than `timeout` seconds: a
    worker that overruns or dies is killed and replaced, so the pool never stalls."""
    if not jobs:
        return {}
    ctx = _context()
    count = max(1, min(workers or default_workers(), len(jobs)))
    pool = [_Worker(ctx) for _ in range(count)]
    queue = list(reversed(jobs))
    outcomes: dict[int, JobOutcome] = {}
    try:
        while queue or any(w.index is not None for w in pool):
            for worker in pool:
                if worker.index is None and queue:
                    i = queue.pop()
                    worker.submit(i, jobs[i], timeout)
            busy = [w for w in pool if w.index is not None]
            wait_for = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=wait_for)
            for position, worker in enumerate(pool):
                if worker.index is None:
                    continue
                if worker.conn in ready:
                    try:
                        index, value, error = worker.conn.recv()
                    except EOFError:  # the worker died (e.g. out of memory): flag, replace
                        index, value, error = worker.index, None, "the worker died"
                        worker.kill()
                        pool[position] = worker = _Worker(ctx)
                    outcomes[index] = JobOutcome(value, False, error)
                elif time.monotonic() >= worker.deadline:
                    outcomes[worker.index] = JobOutcome(None, True, None)
                    worker.kill()
                    pool[position] = worker = _Worker(ctx)
                else:
                    continue
                worker.index = None
                if on_progress:
                    on_progress(1)
    finally:
        for worker in pool:
            if worker.index is not None:
                worker.kill()
            else:
                worker.stop()
    return outcomes


def verify_batch(responses: Sequence[str], answers: Sequence[str], workers: int | None = None,
                 timeout: float = 5.0,
                 on_progress: Callable[[int], None] | None = None) -> list[Verdict]:
    """Verdicts for each (response, gold answer) pair; never hangs longer than `timeout` each.

    Responses without a box are wrong without a worker call; a verifier crash scores wrong
    with `error=True`. `on_progress(k)` is called with the number of newly finished responses.
    """
    if len(responses) != len(answers):
        raise ValueError("responses and answers differ in length")
    extracted = [extract_boxed(text) for text in responses]
    jobs = {i: ("verify", box, answers[i]) for i, box in enumerate(extracted) if box is not None}
    if on_progress and len(jobs) < len(responses):
        on_progress(len(responses) - len(jobs))
    outcomes = run_jobs(jobs, workers, timeout, on_progress)
    verdicts = []
    for i, box in enumerate(extracted):
        outcome = outcomes.get(i)
        if outcome is None:
            verdicts.append(Verdict(False, None))
        else:
            verdicts.append(Verdict(bool(outcome.value), box, outcome.timed_out,
                                    outcome.error is not None))
    return verdicts


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
