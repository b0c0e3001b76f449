"""A pool of worker processes that run jobs with a hard deadline each.

Reward functions run here (rewards.judge). math-verify's own timeout relies on SIGALRM (main
thread only, and useless inside a long C-level sympy call), and a user's function may hang
or crash, so a worker that overruns or dies is killed and replaced: the pool never stalls,
and the job is reported as timed out (or failed) for the caller to decide what it means.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any


@dataclass(frozen=True)
class JobOutcome:
    value: Any = None  # the job's result, when it finished
    timed_out: bool = False
    error: str | None = None  # the exception it raised, or "the worker died"


def _worker_main(conn, function: Callable[..., Any]) -> None:
    """Answer (index, args) requests with function(*args) until told to stop (None)."""
    # math-verify warns that its own timeouts are off: deliberate, the parent enforces them.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    conn.send(READY)  # the parent starts a job's deadline only from here
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, args = message
        try:
            result = (index, function(*args), None)
        except Exception as exc:  # reported to the parent, which decides what it means
            result = (index, None, f"{type(exc).__name__}: {exc}")
        conn.send(result)


READY = "ready"
# What the pool's fork server imports once; rewards.warmup also runs one check there.
FORKSERVER_PRELOAD = ["math_verify", "dcpo_cli.rewards", "dcpo_cli.rewards.warmup"]


def _context():
    # forkserver: cheap forks of a clean process that has math_verify preloaded (and warmed),
    # and safe even when the caller has torch threads running (plain fork is not).
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


class _Worker:
    def __init__(self, ctx, function: Callable[..., Any]) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, function), daemon=True)
        self.process.start()
        child.close()
        self.ready = False  # until it says so: starting is not part of any job's time
        self.index: int | None = None
        self.deadline = 0.0

    def submit(self, index: int, args: tuple, timeout: float) -> None:
        self.index, self.deadline = index, time.monotonic() + timeout
        self.conn.send((index, args))

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


def run_jobs(function: Callable[..., Any], jobs: dict[int, tuple], workers: int | None,
             timeout: float,
             on_progress: Callable[[int], None] | None = None) -> dict[int, JobOutcome]:
    """`function(*jobs[i])` for every i, in worker processes, none longer than `timeout`
    seconds. `function` must be importable by name (a module-level function).

    A job's `timeout` counts from when it is handed to a worker that is ready: a worker's
    start (the fork server's first start imports and warms math-verify, seconds on a busy
    machine) is never charged to the job it then runs."""
    if not jobs:
        return {}
    ctx = _context()
    count = max(1, min(workers or default_workers(), len(jobs)))
    pool = [_Worker(ctx, function) for _ in range(count)]
    queue = list(reversed(jobs))
    outcomes: dict[int, JobOutcome] = {}
    try:
        while queue or any(w.index is not None for w in pool):
            for worker in pool:
                if worker.ready and worker.index is None and queue:
                    i = queue.pop()
                    worker.submit(i, jobs[i], timeout)
            busy = [w for w in pool if w.index is not None]
            starting = [w for w in pool if not w.ready]
            wait_for = max(0.0, min(w.deadline for w in busy) - time.monotonic()) if busy \
                else None
            ready = wait([w.conn for w in busy + starting], timeout=wait_for)
            for position, worker in enumerate(pool):
                if not worker.ready:
                    if worker.conn in ready:
                        _started(worker)
                    continue
                if worker.index is None:
                    continue
                if worker.conn in ready:
                    try:
                        index, value, error = worker.conn.recv()
                    except EOFError:  # the worker died (e.g. out of memory): flag, replace
                        index, value, error = worker.index, None, "the worker died"
                        worker.kill()
                        pool[position] = worker = _Worker(ctx, function)
                    outcomes[index] = JobOutcome(value, False, error)
                elif time.monotonic() >= worker.deadline:
                    outcomes[worker.index] = JobOutcome(None, True, None)
                    worker.kill()
                    pool[position] = worker = _Worker(ctx, function)
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


def _started(worker: _Worker) -> None:
    """Take a starting worker's ready message."""
    try:
        message = worker.conn.recv()
    except EOFError:
        raise RuntimeError("a reward worker process died while starting") from None
    if message != READY:
        raise RuntimeError(f"a reward worker process said {message!r} instead of starting")
    worker.ready = True
