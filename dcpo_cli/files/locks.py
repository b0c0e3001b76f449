"""Exclusive use of a run directory, a checkpoint being written or a SAS state file.

Two `dcpo run` on one RUN_DIR (or two `train-step` writing one checkpoint or one state file)
would train the same steps twice and corrupt each other's files. Each takes a lock first:
`flock` on a small file beside the path (`.NAME.lock`), which the kernel releases when the
process ends, however it ends, so a lock left by a killed process never blocks a resume.
The file holds the holder's pid, host and command line for the refusal message, and is
removed on a clean exit.

Locks are reentrant within a process (`dcpo run` holds RUN_DIR's and calls train-step's code,
which takes its own on paths inside it), and only rank 0 of a torchrun job takes them (the
job is one holder; `--nproc-per-node`'s launcher takes them before it starts the ranks and
tells them so through DCPO_LOCKS_HELD).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from dcpo_cli.errors import DcpoError
from dcpo_cli.parallel.launch import LOCKS_HELD_ENV

# lock file -> (fd, holders in this process, folders made for it: removed again if left empty)
_held: dict[Path, tuple[int, int, list[Path]]] = {}


def lock_file(path: Path) -> Path:
    path = Path(path).absolute()
    return path.parent / f".{path.name}.lock"


def _holder(lock: Path) -> str:
    try:
        text = lock.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def _acquire(path: Path) -> None:
    lock = lock_file(path)
    if lock in _held:
        fd, count, made = _held[lock]
        _held[lock] = (fd, count + 1, made)
        return
    made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            _remove_empty(made)
            raise DcpoError(f"{path}: in use by {_holder(lock)}; wait for it to finish or "
                            "stop it") from None
        try:  # the holder before us may have removed the file between our open and flock
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    who = f"pid {os.getpid()} on {socket.gethostname()} since {started}: dcpo " \
          f"{' '.join(sys.argv[1:])}".strip()
    os.ftruncate(fd, 0)
    os.write(fd, (who + "\n").encode())
    _held[lock] = (fd, 1, made)


def _release(path: Path) -> None:
    lock = lock_file(path)
    fd, count, made = _held[lock]
    if count > 1:
        _held[lock] = (fd, count - 1, made)
        return
    del _held[lock]
    with contextlib.suppress(OSError):
        lock.unlink()  # while still held: a waiter re-checks the inode (see _acquire)
    os.close(fd)
    _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders made only to hold a lock file (deepest first) if still empty:
    a refused or failed command leaves nothing behind."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def takes_locks() -> bool:
    """False in the ranks of a torchrun job other than 0, and under a launcher holding them."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get(LOCKS_HELD_ENV) != "1"


@contextlib.contextmanager
def exclusive(*paths: Path | str | None) -> Iterator[None]:
    """Hold the locks of `paths` (None entries skipped) for the block, or raise DcpoError
    naming the first path in use and its holder, before anything is written."""
    targets = [Path(p) for p in paths if p is not None] if takes_locks() else []
    taken: list[Path] = []
    try:
        for target in targets:
            _acquire(target)
            taken.append(target)
        yield
    finally:
        for target in reversed(taken):
            _release(target)
