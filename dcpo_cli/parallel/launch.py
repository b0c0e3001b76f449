"""`dcpo train-step --nproc-per-node N`: the same command re-run under torchrun.

The launcher runs `python -m torch.distributed.run --standalone --nproc-per-node N -m
dcpo_cli train-step <the same arguments>` and waits. A bad input found by the workers comes
back as one line and exit 2 (rank 0 writes the message to a file this process names, and the
workers then exit 0), not as torchrun's failure report. torch-free until the launch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dcpo_cli.errors import DcpoError

ERROR_FILE_ENV = "DCPO_ERROR_FILE"  # the same name as distributed.ERROR_FILE_ENV


# Set for the ranks: the launcher holds the output's locks (files/locks.py) for them.
LOCKS_HELD_ENV = "DCPO_LOCKS_HELD"
_argv: list[str] = []


def remember_argv(argv: list[str]) -> None:
    """Called by the CLI with the command's arguments, which `relaunch` passes on."""
    global _argv
    _argv = list(argv)


def current_argv() -> list[str]:
    """The arguments of the command being run (for `train-step --nproc-per-node`)."""
    return list(_argv)


def strip_option(argv: list[str], name: str) -> list[str]:
    """`argv` without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(f"{name}="):
            out.append(arg)
    return out


def relaunch(argv: list[str], nproc: int) -> int:
    """Run the train-step command line `argv` (without --nproc-per-node) on `nproc`
    processes of this node; returns the exit code, raises DcpoError for a bad input."""
    if nproc < 1:
        raise DcpoError(f"--nproc-per-node {nproc}: must be at least 1")
    if os.environ.get("RANK") is not None:
        raise DcpoError("--nproc-per-node: already running under torchrun; drop the option")
    with tempfile.TemporaryDirectory(prefix="dcpo-launch-") as tmp:
        error_file = Path(tmp) / "error"
        env = {**os.environ, ERROR_FILE_ENV: str(error_file), LOCKS_HELD_ENV: "1"}
        # torchrun warns unless this is set; share the cores out as it would
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(nproc), "-m", "dcpo_cli", *argv]
        code = subprocess.call(command, env=env)
        if error_file.is_file():
            raise DcpoError(error_file.read_text().strip())
        return code
