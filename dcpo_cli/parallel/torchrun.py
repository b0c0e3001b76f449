"""The process `--nproc-per-node` starts: torchrun itself (`torch.distributed.run`), with
its own logs quieted and its failure report turned into one line.

When a rank fails, torchrun stops the others and raises `ChildFailedError`; instead of its
report, the cause of the first failure goes to the launcher's error file (DCPO_ERROR_FILE):
the rank's own one-line error (which `cli.py` leaves in DCPO_ERROR_FILE.rank<R> for an
unexpected error), or the signal that killed it. The launcher prints it and exits 2.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from dcpo_cli.parallel.launch import ERROR_FILE_ENV


def first_failure_line(failures: dict, error_file: Path, command: str) -> str:
    """One line for torchrun's first failure: `failures` is ChildFailedError.failures
    (global rank -> ProcessFailure, with exitcode and timestamp)."""
    # A rank killed by a signal is the cause; the others then fail on their collectives
    # (connection closed), usually seen in the same poll of torchrun's
    # (the ranks torchrun stopped itself show SIGTERM: the last to blame)
    def order(r: int) -> tuple:
        code = failures[r].exitcode
        blame = 0 if code < 0 and code != -signal.SIGTERM else 1 if code > 0 else 2
        return (blame, failures[r].timestamp, r)

    rank = min(failures, key=order)
    failure = failures[rank]
    own = Path(f"{error_file}.rank{rank}")
    if own.is_file():
        cause = own.read_text().strip()
    elif failure.exitcode < 0:
        try:
            cause = f"killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            cause = f"killed by signal {-failure.exitcode}"
    else:
        cause = f"exit code {failure.exitcode}"
    return (f"{command}: rank {rank} died ({cause}); the other ranks were stopped and nothing "
            "half-written was kept: run the same command again to resume")


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's agent logs every start and stop at INFO/WARNING ("Sending process ...
    # closing signal"); a failure is reported below, as one line
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    error_file = os.environ.get(ERROR_FILE_ENV)
    # torchrun's parser would take an abbreviation of its own flags from the command's
    # arguments (`--n 8` as --nnodes), so they are set aside and handed over as they are
    split = argv.index("dcpo_cli") + 1 if "dcpo_cli" in argv else len(argv)
    args = parse_args(argv[:split])
    args.training_script_args = argv[split:]
    try:
        run(args)
    except ChildFailedError as exc:
        if not error_file:
            raise
        if not Path(error_file).is_file():  # a bad input reported by rank 0 comes first
            command = next((a for a in argv[argv.index("dcpo_cli") + 1:]
                            if not a.startswith("-")), "dcpo") if "dcpo_cli" in argv else "dcpo"
            Path(error_file).write_text(first_failure_line(exc.failures, Path(error_file),
                                                           f"dcpo {command}") + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
