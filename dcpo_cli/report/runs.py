"""`dcpo report`: gather a run's per-step metrics and eval summaries, tabulate and plot them.

Reading (`gather_run`) is pure and separate from drawing (`plot_runs`), so tests can check
what was gathered without matplotlib. Metrics come from `RUN/metrics.jsonl` (one train-step
record per line) or, when that file is absent, from every `RUN/ckpt/*/metrics.json`; eval
results from `RUN/eval/<label>/summary.json`. Missing metric keys are tolerated everywhere:
a line that has no data is simply not drawn.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError
from dcpo_cli.files import run_layout
from dcpo_cli.files.jsonl import parse_jsonl
from dcpo_cli.report import plots

# (metrics key, table header, format) for the per-step table, in display order.
TABLE_COLUMNS: list[tuple[str, str, str]] = [
    ("global_step", "global step", "d"),
    ("reward_mean", "reward", ".3f"),
    ("clip_ratio", "TCR", ".4f"),
    ("clip_ratio_low", "TCR low", ".4f"),
    ("clip_ratio_high", "TCR high", ".4f"),
    ("nonzero_advantage_ratio", "RUR", ".3f"),
    ("response_length_mean", "length", ".1f"),
    ("truncated_ratio", "truncated", ".3f"),
    ("approx_kl", "KL", ".2e"),
    ("kl_ref", "KL ref", ".2e"),
    ("mismatch_kl", "mismatch KL", ".2e"),
    ("entropy", "entropy", ".3f"),
    ("grad_norm", "grad norm", ".3f"),
    ("lr", "lr", ".2e"),
    ("tokens_per_second", "tok/s", ".0f"),
    ("seconds", "seconds", ".1f"),
]

def as_number(value: Any) -> float | None:
    """A finite number or None: metrics may hold nulls, strings or NaN, which are not drawn."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise DcpoError(f"{path}: cannot read ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise DcpoError(f"{path}: not valid JSON ({exc})") from exc


def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; blank lines are skipped, a bad line is an error."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DcpoError(f"{path}: cannot read ({exc})") from exc
    return parse_jsonl(text, str(path))


def _step_of(record: dict[str, Any], position: int) -> int:
    """The rollout step of a record (falling back to global_step, then to its position)."""
    for key in ("step", "global_step"):
        value = as_number(record.get(key))
        if value is not None:
            return int(value)
    return position


def load_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], Path]:
    """Per-step metrics records sorted by step, and the file or folder they came from.

    A step logged twice (a train step rerun after a crash appends again) keeps its last record.
    """
    log = run_layout.metrics_log(run_dir)
    if log.is_file():
        records, source = read_metrics_log(log), log
    else:
        records, source = [], run_dir / run_layout.CHECKPOINTS
        for path in sorted(source.glob("*/metrics.json")):
            record = _read_json(path)
            if not isinstance(record, dict):
                raise DcpoError(f"{path}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    if not records:
        raise DcpoError(f"{run_dir}: no metrics found (neither metrics.jsonl nor "
                        "ckpt/*/metrics.json has a record)")
    by_step = {_step_of(record, i): record for i, record in enumerate(records)}
    return [{**by_step[step], "step": step} for step in sorted(by_step)], source


def load_evals(run_dir: Path) -> list[dict[str, Any]]:
    """One row per (eval label, benchmark): label, step (from `step-NNNNNN`, else the
    summary's `_step`, else None), benchmark and its numbers. Keys starting with `_` are
    not benchmarks."""
    rows = []
    for path in sorted((run_dir / run_layout.EVALS).glob("*/summary.json")):
        summary = _read_json(path)
        if not isinstance(summary, dict):
            raise DcpoError(f"{path}: expected a JSON object, got {type(summary).__name__}")
        label = path.parent.name
        step = run_layout.label_step(label)
        if step is None:
            step = as_number(summary.get("_step"))
        benchmarks = [b for b in summary if not b.startswith("_") and b != "average"]
        for benchmark, values in summary.items():
            if benchmark.startswith("_") or not isinstance(values, dict):
                continue
            if benchmark == "average" and len(benchmarks) == 1:
                continue  # the average of one benchmark is that benchmark again
            numbers = {k: v for k, v in values.items() if as_number(v) is not None}
            rows.append({"label": label, "step": None if step is None else int(step),
                         "benchmark": benchmark, **numbers})
    return rows


def gather_run(run_dir: Path) -> dict[str, Any]:
    """Everything the report shows about one run, as plain JSON-ready data."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DcpoError(f"{run_dir}: no such run directory")
    metrics, source = load_metrics(run_dir)
    algos = [r["algo"] for r in metrics if isinstance(r.get("algo"), str)]
    return {"name": run_dir.resolve().name, "path": str(run_dir), "algo": algos[-1] if algos
            else None, "metrics_source": str(source), "metrics": metrics,
            "evals": load_evals(run_dir)}


def gather(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """Gather several runs and give each a distinct legend label (dir name + algo)."""
    runs = [gather_run(Path(d)) for d in run_dirs]
    names = [run["name"] for run in runs]
    for run in runs:
        name = run["name"] if names.count(run["name"]) == 1 else run["path"]
        run["label"] = f"{name} ({run['algo']})" if run["algo"] else name
    return runs


def series(run: dict[str, Any], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric over a run, leaving out steps that lack it."""
    points = [(r["step"], as_number(r.get(key))) for r in run["metrics"]]
    points = [(s, v) for s, v in points if v is not None]
    return [s for s, _ in points], [v for _, v in points]


def eval_series(run: dict[str, Any]) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    """(benchmark, avg@k key) -> (steps, accuracy %) over the run's evals that have a step."""
    out: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
    for row in sorted((r for r in run["evals"] if r["step"] is not None),
                      key=lambda r: r["step"]):
        for key in sorted(k for k in row if k.startswith("avg@")):
            steps, values = out.setdefault((row["benchmark"], key), ([], []))
            steps.append(row["step"])
            values.append(float(row[key]))
    return out


# --- tables ----------------------------------------------------------------------------------


def _format(value: Any, spec: str) -> str:
    number = as_number(value)
    if number is None:
        return "–"
    return format(int(number), spec) if spec == "d" else format(number, spec)


def metrics_table(run: dict[str, Any]):
    """A rich table with one row per step; columns with no data in this run are left out."""
    from rich.table import Table

    columns = [c for c in TABLE_COLUMNS if any(as_number(r.get(c[0])) is not None
                                               for r in run["metrics"])]
    source = run_layout.METRICS_LOG if run["metrics_source"].endswith(".jsonl") \
        else f"{run_layout.CHECKPOINTS}/*/metrics.json"
    table = Table(title=f"{run['label']}: {len(run['metrics'])} steps (from {source})")
    table.add_column("step", justify="right")
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for record in run["metrics"]:
        table.add_row(str(record["step"]), *(_format(record.get(k), f) for k, _, f in columns))
    return table


def evals_table(runs: list[dict[str, Any]]):
    """A rich table of every eval summary of every run, or None when there is none."""
    from rich.table import Table

    rows = [(run["label"], row) for run in runs for row in run["evals"]]
    if not rows:
        return None
    keys: list[str] = []
    for _, row in rows:
        keys += [k for k in row if k not in ("label", "step", "benchmark") and k not in keys]
    table = Table(title="evaluations (accuracy in %)")
    for header in ("run", "eval", "step", "benchmark", *keys):
        table.add_column(header, justify="left" if header in ("run", "eval", "benchmark")
                         else "right")
    for label, row in sorted(rows, key=lambda x: (x[0], x[1]["step"] is None,
                                                  x[1]["step"] or 0, x[1]["benchmark"])):
        cells = [_format(row.get(k), "d" if k == "problems" else ".1f") for k in keys]
        table.add_row(label, row["label"], "–" if row["step"] is None else str(row["step"]),
                      row["benchmark"], *cells)
    return table


# --- plot ------------------------------------------------------------------------------------

_LINESTYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def _style(n_runs: int, run_index: int, series_index: int) -> dict[str, Any]:
    """One run: a colour per series. Several runs: a colour per run (named in the figure
    legend), a line style per series (named in the panel legend)."""
    if n_runs == 1:
        return {"color": f"C{series_index % 10}", "linestyle": "-"}
    return {"color": f"C{run_index % 10}",
            "linestyle": _LINESTYLES[series_index % len(_LINESTYLES)]}


def _legend_entry(n_runs: int, line, label: str) -> Any:
    """The panel legend shows series, not runs: with several runs, a grey stand-in line."""
    if n_runs > 1:
        return plots.stand_in(label, line.get_linestyle(), line.get_marker())
    line.set_label(label)
    return line


def _lines(ax, runs, keys: list[tuple[str, str]], first_series: int = 0) -> list:
    """Draw metric `keys` ((metrics key, legend name)) of every run on `ax`; return the
    legend entries, one per series that has data."""
    entries: dict[str, Any] = {}
    for r, run in enumerate(runs):
        for i, (key, name) in enumerate(keys):
            steps, values = series(run, key)
            if not steps:
                continue
            (line,) = ax.plot(steps, values, marker="o" if len(steps) < 40 else None, markersize=3,
                              **_style(len(runs), r, first_series + i))
            entries.setdefault(name, _legend_entry(len(runs), line, name))
    return list(entries.values())


def _finish(ax, title: str, ylabel: str, handles: list, legend_ax=None) -> None:
    plots.finish_panel(ax, title, ylabel, handles, empty=not handles, legend_ax=legend_ax)


def _reward_panel(ax, runs) -> None:
    """Train reward (left axis) and eval avg@k per benchmark at the eval's step (right, %)."""
    handles = _lines(ax, runs, [("reward_mean", "train reward")])
    accuracy = ax.twinx()
    curves = [eval_series(run) for run in runs]
    names = sorted({name for run_curves in curves for name in run_curves})
    entries: dict[tuple[str, str], Any] = {}
    for r, run_curves in enumerate(curves):
        for (benchmark, key), (steps, values) in run_curves.items():
            k = names.index((benchmark, key))  # same marker for a benchmark in every run
            color = f"C{r % 10}" if len(runs) > 1 else f"C{(k + 1) % 10}"
            (line,) = accuracy.plot(steps, values, marker=_MARKERS[k % len(_MARKERS)],
                                    linestyle=":", color=color)
            if (benchmark, key) not in entries:
                entries[benchmark, key] = _legend_entry(len(runs), line, f"eval {benchmark} {key}")
    handles += [entries[name] for name in names]
    if names:
        accuracy.set_ylabel("eval accuracy (%)")
    else:
        accuracy.set_yticks([])
    _finish(ax, "Reward and accuracy", "train reward (mean)", handles, legend_ax=accuracy)


def _length_panel(ax, runs) -> None:
    handles = _lines(ax, runs, [("response_length_mean", "mean length")])
    truncated = ax.twinx()
    more = _lines(truncated, runs, [("truncated_ratio", "truncated fraction")], first_series=1)
    truncated.set_ylabel("truncated fraction" if more else "")
    if not more:
        truncated.set_yticks([])
    _finish(ax, "Response length", "tokens", handles + more, legend_ax=truncated)


def plot_runs(runs: list[dict[str, Any]], out_path: Path) -> Path:
    """Write the report figure (nine panels) to `out_path`, atomically; the format follows
    the suffix (png by default)."""
    with plots.figure(out_path, 3, 3, (18, 14), dpi=100) as (fig, axes):
        (reward, clip, rur), (length, kl, entropy), (kl_ref, mismatch, outside) = axes
        _reward_panel(reward, runs)
        _finish(clip, "Token clipping ratio", "fraction of response tokens clipped",
                _lines(clip, runs, [("clip_ratio", "total"), ("clip_ratio_low", "low side"),
                                    ("clip_ratio_high", "high side")]))
        _finish(rur, "Response utilization (nonzero advantage)", "fraction of responses",
                _lines(rur, runs, [("nonzero_advantage_ratio", "nonzero advantage")]))
        _length_panel(length, runs)
        _finish(kl, "Approximate KL (old vs new policy)", "approx KL",
                _lines(kl, runs, [("approx_kl", "approx KL")]))
        _finish(entropy, "Entropy", "mean token entropy (nats)",
                _lines(entropy, runs, [("entropy", "entropy")]))
        _finish(kl_ref, "KL to the reference policy (start of step)",
                "mean per-token estimate (--kl-type)",
                _lines(kl_ref, runs, [("kl_ref", "KL to reference")]))
        _finish(mismatch, "Sampler-trainer mismatch", "per token",
                _lines(mismatch, runs, [("mismatch_kl", "KL (k3)"),
                                        ("mismatch_logprob_diff", "mean |log-prob diff|")]))
        _finish(outside, "Mismatch: ratio outside [0.5, 2]", "fraction of tokens",
                _lines(outside, runs, [("mismatch_outside_ratio", "outside [0.5, 2]")]))
        fig.suptitle("dcpo report: " + " vs ".join(run["label"] for run in runs))
        top = 0.97
        if len(runs) > 1:  # colours name the runs, once for the whole figure
            plots.colour_legend(fig, [run["label"] for run in runs], ncol=min(len(runs), 4),
                          top=0.965)
            top = 0.97 - 0.024 * math.ceil(len(runs) / 4)
        fig.tight_layout(rect=(0, 0, 1, top))
    return Path(out_path)
