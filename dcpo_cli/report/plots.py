"""The drawing both reports share: a figure of panels written atomically, a panel's axes and
legend, the colours that name the runs (or a study's algorithms). matplotlib is imported
inside the functions, so gathering and the tables never load it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError

GREY = "0.35"  # legend stand-ins for a line style or marker shared by every run


@contextlib.contextmanager
def figure(out_path: Path, rows: int, cols: int, size: tuple[float, float], dpi: int
           ) -> Iterator[tuple[Any, Any]]:
    """A figure of rows x cols panels, `(fig, axes)`, written to `out_path` atomically when
    the block ends (the format follows the suffix, png by default); closed either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dcpo_cli.files.contracts import atomic_path

    out_path = Path(out_path)
    fmt = out_path.suffix.lstrip(".").lower() or "png"
    fig, axes = plt.subplots(rows, cols, figsize=size)
    try:
        if fmt not in fig.canvas.get_supported_filetypes():
            raise DcpoError(f"{out_path}: cannot write a '.{fmt}' figure (use .png, .pdf or .svg)")
        yield fig, axes
        try:
            with atomic_path(out_path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=dpi)
        except OSError as exc:
            raise DcpoError(f"{out_path}: cannot write ({exc.strerror or exc})") from exc
    finally:
        plt.close(fig)


def finish_panel(ax, title: str, ylabel: str, handles: Sequence = (), *, empty: bool,
                 legend_ax=None) -> None:
    """Steps on the x axis (whole numbers), titles, the legend of `handles` (drawn on
    `legend_ax`, a twin axis, if given) and "no data" on an `empty` panel."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    low, high = ax.get_xlim()
    if high - low < 2:  # one step: widen, or the integer locator falls back to fractions
        ax.set_xlim((low + high) / 2 - 1, (low + high) / 2 + 1)
    ax.set_title(title)
    ax.set_xlabel("rollout step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if handles:
        (legend_ax or ax).legend(handles=list(handles), fontsize="small", framealpha=0.7)
    if empty:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes,
                color="grey")


def stand_in(label: str, linestyle: str = "-", marker: str | None = None):
    """A grey legend line: a series' style when the colours name runs, not series."""
    from matplotlib.lines import Line2D

    return Line2D([], [], color=GREY, linestyle=linestyle, marker=marker, label=label)


def colour_legend(fig, labels: Sequence[str], ncol: int, top: float) -> None:
    """One legend for the whole figure: colour C{i} names `labels[i]` (a run, an algorithm)."""
    from matplotlib.lines import Line2D

    fig.legend(handles=[Line2D([], [], color=f"C{i % 10}", linewidth=3, label=label)
                        for i, label in enumerate(labels)],
               loc="upper center", ncol=ncol, bbox_to_anchor=(0.5, top))
