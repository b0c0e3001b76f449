"""`dcpo train-step --nproc-per-node N` and `dcpo run --nproc-per-node N`: the same
command re-run under torchrun.

The launcher runs `python -m dcpo_cli.parallel.torchrun --standalone --nproc-per-node N -m
dcpo_cli <the same arguments>` (torchrun itself, quieted; `--nnodes`, `--node-rank`,
`--master-addr`, `--master-port` for several nodes) and waits. A bad input found by the
workers comes back as one line and exit 2 (rank 0 writes the message to a file this process
names, and the workers then exit 0), and so does a rank that died (its cause: the signal,
or its own error), not torchrun's failure report. torch-free until the launch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Launch:
    """torchrun's flags, as `dcpo run` and `dcpo train-step` take them."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    def torchrun_flags(self) -> list[str]:
        flags = ["--nproc-per-node", str(self.nproc_per_node)]
        if self.nnodes == 1 and self.master_addr is None:
            return ["--standalone", *flags]  # one node: a local rendezvous on a free port
        return [*flags, "--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank),
                "--master-addr", self.master_addr or "127.0.0.1",
                "--master-port", str(self.master_port or 29500)]

    def check(self) -> None:
        if self.nproc_per_node < 1:
            raise DcpoError(f"--nproc-per-node {self.nproc_per_node}: must be at least 1")
        if self.nnodes < 1:
            raise DcpoError(f"--nnodes {self.nnodes}: must be at least 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise DcpoError(f"--node-rank {self.node_rank}: must be in 0..{self.nnodes - 1} "
                            f"(--nnodes {self.nnodes})")
        if self.nnodes > 1 and self.master_addr is None:
            raise DcpoError(f"--nnodes {self.nnodes} needs --master-addr (the address of the "
                            "node with --node-rank 0, which every node can reach)")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise DcpoError(f"--master-port {self.master_port}: not a port number")

    def check_capacity(self) -> None:
        """`dcpo run`: no more processes than this node has GPUs (else CPU cores); one
        engine and one trainer shard each (train-step's relaunch may oversubscribe)."""
        devices, kind = local_devices()
        if self.nproc_per_node > devices:
            raise DcpoError(f"--nproc-per-node {self.nproc_per_node}: this machine can run "
                            f"{devices} ({devices} {kind}{'s' if devices != 1 else ''}; one "
                            "process each)")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


LAUNCH_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--master-addr",
                "--master-port")


def local_devices() -> tuple[int, str]:
    """How many processes this node can run: one per GPU, else one per CPU core."""
    import torch  # only when launching

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPU"
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1), "CPU core"


def relaunch(argv: list[str], launch: Launch | int) -> int:
    """Run the command line `argv` (without the launch flags) on this node's processes of
    `launch` (an int: that many on this node alone); returns the exit code, raises DcpoError
    for a bad input or a rank that died (its cause, one line)."""
    if isinstance(launch, int):
        launch = Launch(launch)
    launch.check()
    if os.environ.get("RANK") is not None:
        raise DcpoError("--nproc-per-node: already running under torchrun; drop the option")
    for flag in LAUNCH_FLAGS:
        argv = strip_option(argv, flag)
    with tempfile.TemporaryDirectory(prefix="dcpo-launch-") as tmp:
        error_file = Path(tmp) / "error"
        env = {**os.environ, ERROR_FILE_ENV: str(error_file), LOCKS_HELD_ENV: "1"}
        # torchrun warns unless this is set; share the cores out as it would
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                  // launch.nproc_per_node)))
        command = [sys.executable, "-m", "dcpo_cli.parallel.torchrun",
                   *launch.torchrun_flags(), "-m", "dcpo_cli", *argv]
        code = subprocess.call(command, env=env)
        if error_file.is_file():
            raise DcpoError(error_file.read_text().strip())
        return code
