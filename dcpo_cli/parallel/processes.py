"""Child processes that never outlive the one that started them, and the cores they share."""

from __future__ import annotations

import os
import signal


def die_with_parent() -> None:
    """In a child: SIGKILL when the parent dies (Linux's PR_SET_PDEATHSIG), so a killed
    `dcpo study` or `dcpo run` leaves no run or generation worker going that its re-run
    would start a second time."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
