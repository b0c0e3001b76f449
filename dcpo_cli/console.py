"""Shared rich consoles: results a person reads go to stdout, progress and errors to stderr."""

from rich.console import Console

out = Console()
err = Console(stderr=True)


def progress(transient: bool = False):
    """The progress bar every long stage uses (on stderr, so stdout stays clean for tables)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class _Progress(Progress):
        def __exit__(self, kind, value, traceback) -> None:
            if kind is not None:  # a failure leaves its one error line, not the bar
                self.live.transient = True
            super().__exit__(kind, value, traceback)

    return _Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
    )
