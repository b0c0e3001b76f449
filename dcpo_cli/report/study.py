"""`dcpo report STUDY_DIR`: a study's runs side by side, per algorithm over its seeds.

Reading is `runs.gather_run` on every run directory of the study (the same metrics and
eval summaries a single-run report reads); `summarize` reduces each run to the paper's
figures and each algorithm to their mean and sample standard deviation over seeds, with the
ratio of the means to a baseline algorithm; `study_curves` gives, per algorithm, the mean
and the min-max band over seeds at every step. Drawing (`plot_study`, with plots.py) is
separate, so tests check the numbers without matplotlib.

Per run: the final avg@1 and avg@K are its last evaluation (the one benchmark, or the
average over several); RUR and TCR are the means over its steps of `nonzero_advantage_ratio`
and `clip_ratio`; groups sampled per group trained is the sum over its steps of
`groups_generated` over the sum of `groups_trained` (1 without DAPO's filter); wall time is
what the study measured for the run (`wall_seconds.json`, every attempt summed).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError
from dcpo_cli.files import run_layout
from dcpo_cli.report import plots
from dcpo_cli.report.runs import as_number, gather_run, series

BAND = "min-max over seeds"
# (key, header, format): the table's figures, in order
FIGURES: list[tuple[str, str, str]] = [
    ("final_avg@1", "final avg@1 %", ".1f"),
    ("final_avg@k", "final avg@k %", ".1f"),
    ("rur", "mean RUR", ".3f"),
    ("tcr", "mean TCR", ".4f"),
    ("sampled_per_trained", "groups sampled / trained", ".2f"),
    ("wall_seconds", "wall s", ".0f"),
]
# (metrics key or derived name, panel title, y label) for the curves
CURVES: list[tuple[str, str, str]] = [
    ("reward_mean", "Train reward", "mean reward"),
    ("eval", "Test accuracy", "accuracy (%)"),
    ("nonzero_advantage_ratio", "RUR: responses with nonzero advantage", "fraction"),
    ("clip_ratio", "TCR: trained tokens clipped", "fraction"),
    ("entropy", "Entropy", "mean token entropy (nats)"),
    ("response_length_mean", "Response length", "tokens"),
    ("approx_kl", "Approximate KL (old vs new policy)", "approx KL"),
    ("sampled_per_trained", "Groups sampled per group trained", "groups_generated / "
     "groups_trained"),
]


def gather_study(directory: Path) -> dict[str, Any]:
    """Every run of the study that has metrics, with its algorithm, seed and wall time;
    the runs with none yet are listed as missing."""
    from dcpo_cli.run.study import load_study, read_wall

    directory = Path(directory)
    study = load_study(directory)
    if study is None:
        raise DcpoError(f"{directory}: not a study directory (no study.json)")
    wall = read_wall(directory)
    runs, missing = [], []
    for run in study.runs():
        run_dir = study.run_dir(run)
        if not run_layout.metrics_log(run_dir).is_file() and not list(
                (run_dir / run_layout.CHECKPOINTS).glob("*/metrics.json")):
            missing.append(run.name)
            continue
        data = gather_run(run_dir)
        data.update(name=run.name, label=run.name, algo=run.algo, seed=run.seed,
                    wall_seconds=wall.get(run.name))
        runs.append(data)
    if not runs:
        raise DcpoError(f"{directory}: no run of the study has metrics yet")
    return {"study": str(directory), "algos": study.algos, "seeds": study.seeds,
            "runs": runs, "missing": missing}


def final_eval(run: dict[str, Any]) -> dict[str, Any] | None:
    """The run's last evaluation (`eval_at` its last eval step), or None without any
    evaluation at a step."""
    steps = [r["step"] for r in run["evals"] if r["step"] is not None]
    return eval_at(run, max(steps)) if steps else None


def eval_at(run: dict[str, Any], step: int) -> dict[str, Any]:
    """The evaluation at `step`: its benchmark (the one, or "average" over several), avg@1
    and avg@K (the largest K > 1; None without one)."""
    rows = [r for r in run["evals"] if r["step"] == step]
    row = next((r for r in rows if r["benchmark"] == "average"), rows[0])
    ks = sorted(int(key[4:]) for key in row if key.startswith("avg@") and key[4:].isdigit()
                and int(key[4:]) > 1)
    return {"step": step, "benchmark": row["benchmark"], "avg@1": as_number(row.get("avg@1")),
            "k": ks[-1] if ks else None,
            "avg@k": as_number(row.get(f"avg@{ks[-1]}")) if ks else None}


def run_figures(run: dict[str, Any]) -> dict[str, Any]:
    """The table's figures for one run (None where the run has no data for one)."""
    def mean_of(key: str) -> float | None:
        values = [v for v in (as_number(r.get(key)) for r in run["metrics"]) if v is not None]
        return sum(values) / len(values) if values else None

    generated = sum(as_number(r.get("groups_generated")) or 0 for r in run["metrics"])
    trained = sum(as_number(r.get("groups_trained")) or 0 for r in run["metrics"])
    final = final_eval(run) or {}
    return {"final_avg@1": final.get("avg@1"), "final_avg@k": final.get("avg@k"),
            "rur": mean_of("nonzero_advantage_ratio"), "tcr": mean_of("clip_ratio"),
            "sampled_per_trained": generated / trained if trained else None,
            "wall_seconds": as_number(run.get("wall_seconds")),
            "steps": len(run["metrics"]), "eval_step": final.get("step"),
            "benchmark": final.get("benchmark"), "k": final.get("k")}


def summarize(data: dict[str, Any], baseline: str | None = None) -> dict[str, Any]:
    """Per algorithm: mean, sample std (n - 1; None for one seed) and per-seed values of
    each figure, and the ratio of its mean to the baseline's mean."""
    algos = [a for a in data["algos"] if any(r["algo"] == a for r in data["runs"])]
    if baseline is None:
        baseline = "grpo" if "grpo" in algos else algos[0]
    if baseline not in data["algos"]:
        raise DcpoError(f"--baseline {baseline}: not an algorithm of this study "
                        f"({', '.join(data['algos'])})")
    if baseline not in algos:
        raise DcpoError(f"--baseline {baseline}: no run of it has metrics yet")
    rows = []
    for algo in algos:
        runs = [r for r in data["runs"] if r["algo"] == algo]
        per_run = {r["seed"]: run_figures(r) for r in runs}
        figures = {}
        for key, _, _ in FIGURES:
            values = {seed: f[key] for seed, f in per_run.items() if f[key] is not None}
            numbers = list(values.values())
            figures[key] = {"mean": statistics.fmean(numbers) if numbers else None,
                            "std": statistics.stdev(numbers) if len(numbers) > 1 else None,
                            "n": len(numbers), "values": values}
        steps = [f["steps"] for f in per_run.values()]
        evals = sorted({f["eval_step"] for f in per_run.values() if f["eval_step"] is not None})
        ks = sorted({f["k"] for f in per_run.values() if f["k"] is not None})
        rows.append({"algo": algo, "runs": len(runs), "seeds": sorted(per_run),
                     "steps": [min(steps), max(steps)], "eval_steps": evals, "k": ks,
                     "figures": figures})
    base = next(row for row in rows if row["algo"] == baseline)
    for row in rows:
        for key, figure in row["figures"].items():
            reference = base["figures"][key]["mean"]
            figure["ratio"] = (figure["mean"] / reference if figure["mean"] is not None
                               and reference else None)
    return {"study": data["study"], "baseline": baseline, "std": "sample (n - 1) over seeds",
            "missing": data["missing"], "rows": rows}


# --- tables ---------------------------------------------------------------------------------


def _cell(figure: dict[str, Any], spec: str, is_baseline: bool) -> str:
    if figure["mean"] is None:
        return "–"
    text = format(figure["mean"], spec)
    if figure["std"] is not None:
        text += f" ± {format(figure['std'], spec)}"
    if figure["ratio"] is not None and not is_baseline:
        text += f"\n×{figure['ratio']:.2f}"
    return text


def summary_table(summary: dict[str, Any]):
    """The rich table: one row per algorithm, mean ± std over seeds and × the baseline."""
    from rich.table import Table

    k = sorted({k for row in summary["rows"] for k in row["k"]})
    table = Table(title=f"dcpo study {summary['study']}: mean ± std over seeds, "
                  f"×: ratio to {summary['baseline']}", title_justify="left")
    table.add_column("algo")
    table.add_column("seeds", justify="right")
    table.add_column("steps", justify="right")
    for key, header, _ in FIGURES:
        if key == "final_avg@k" and len(k) == 1:
            header = f"final avg@{k[0]} %"
        table.add_column(header, justify="right")
    for row in summary["rows"]:
        low, high = row["steps"]
        table.add_row(row["algo"], str(row["runs"]), str(low) if low == high else f"{low}-{high}",
                      *(_cell(row["figures"][key], spec, row["algo"] == summary["baseline"])
                        for key, _, spec in FIGURES))
    return table


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The table flat, one dict per algorithm (the CSV's rows)."""
    rows = []
    for row in summary["rows"]:
        flat: dict[str, Any] = {"algo": row["algo"], "seeds": row["runs"],
                                "steps_min": row["steps"][0], "steps_max": row["steps"][1],
                                "eval_steps": " ".join(map(str, row["eval_steps"])),
                                "k": " ".join(map(str, row["k"]))}
        for key, _, _ in FIGURES:
            figure = row["figures"][key]
            flat.update({f"{key}_mean": figure["mean"], f"{key}_std": figure["std"],
                         f"{key}_ratio_to_{summary['baseline']}": figure["ratio"]})
        rows.append(flat)
    return rows


def write_table(summary: dict[str, Any], path: Path) -> Path:
    """The table as CSV (one row per algorithm) or JSON (the whole summary, per-seed values
    included), by the suffix; atomically."""
    from dcpo_cli.files.contracts import atomic_path

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps(summary, indent=2, sort_keys=False) + "\n"
    elif suffix == ".csv":
        rows = table_rows(summary)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
        text = buffer.getvalue()
    else:
        raise DcpoError(f"{path}: the table is written as .csv or .json")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as exc:
        raise DcpoError(f"{path}: cannot write ({exc.strerror or exc})") from exc
    return path


# --- curves ---------------------------------------------------------------------------------


def _per_step(series_by_seed: list[dict[int, float]]) -> dict[str, list[float]]:
    """Mean, min and max over the seeds that have each step."""
    steps = sorted({s for series in series_by_seed for s in series})
    out: dict[str, list[float]] = {"steps": [], "mean": [], "low": [], "high": []}
    for step in steps:
        values = [series[step] for series in series_by_seed if step in series]
        out["steps"].append(step)
        out["mean"].append(sum(values) / len(values))
        out["low"].append(min(values))
        out["high"].append(max(values))
    return out


def _metric_series(run: dict[str, Any], key: str) -> dict[int, float]:
    if key == "sampled_per_trained":
        points = {}
        for r in run["metrics"]:
            generated, trained = as_number(r.get("groups_generated")), as_number(
                r.get("groups_trained"))
            if generated is not None and trained:
                points[r["step"]] = generated / trained
        return points
    return dict(zip(*series(run, key), strict=True))


def _eval_series(run: dict[str, Any], which: str) -> dict[int, float]:
    """avg@1 (`which` "1") or avg@K, K > 1 (`which` "k") at each eval step, on the one
    benchmark or the average over several."""
    points = {}
    for step in sorted({r["step"] for r in run["evals"] if r["step"] is not None}):
        value = eval_at(run, step)["avg@1" if which == "1" else "avg@k"]
        if value is not None:
            points[step] = value
    return points


def study_curves(data: dict[str, Any]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """curve name -> algorithm -> {steps, mean, low, high} (low/high: min-max over seeds).
    Curve names: the metrics keys of CURVES, and "eval avg@1" / "eval avg@k"."""
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    algos = [a for a in data["algos"] if any(r["algo"] == a for r in data["runs"])]
    names = [key for key, _, _ in CURVES if key != "eval"] + ["eval avg@1", "eval avg@k"]
    for name in names:
        curves[name] = {}
        for algo in algos:
            runs = [r for r in data["runs"] if r["algo"] == algo]
            if name.startswith("eval "):
                per_seed = [_eval_series(r, name[-1]) for r in runs]
            else:
                per_seed = [_metric_series(r, name) for r in runs]
            curve = _per_step(per_seed)
            if curve["steps"]:
                curves[name][algo] = curve
    return curves


def plot_study(data: dict[str, Any], out_path: Path) -> Path:
    """Write the study figure (eight panels: the mean over seeds per algorithm, shaded
    min-max band) to `out_path`, atomically; the format follows the suffix."""
    curves = study_curves(data)
    algos = [a for a in data["algos"] if any(r["algo"] == a for r in data["runs"])]
    colors = {algo: f"C{i % 10}" for i, algo in enumerate(algos)}
    with plots.figure(out_path, 2, 4, (22, 10), dpi=90) as (fig, axes):
        for ax, (key, title, ylabel) in zip(axes.flat, CURVES, strict=True):
            drawn = []
            parts = [("eval avg@1", "-"), ("eval avg@k", "--")] if key == "eval" else [(key, "-")]
            for name, style in parts:
                for algo, curve in curves[name].items():
                    marker = "o" if len(curve["steps"]) < 30 else None
                    ax.plot(curve["steps"], curve["mean"], linestyle=style, marker=marker,
                            markersize=3, color=colors[algo])
                    ax.fill_between(curve["steps"], curve["low"], curve["high"],
                                    color=colors[algo], alpha=0.2, linewidth=0)
                    drawn.append(name)
            handles = []
            if key == "eval" and drawn:
                k = sorted({f["k"] for r in data["runs"]
                            if (f := final_eval(r)) and f["k"] is not None})
                handles = [plots.stand_in("avg@1 (greedy)"),
                           plots.stand_in(f"avg@{k[-1] if k else 'k'}", linestyle="--")]
            plots.finish_panel(ax, title, ylabel, handles, empty=not drawn)
        seeds = sorted({r["seed"] for r in data["runs"]})
        fig.suptitle(f"dcpo study {Path(data['study']).name}: mean over seeds "
                     f"({', '.join(map(str, seeds))}); shaded: {BAND}")
        plots.colour_legend(fig, algos, ncol=len(algos), top=0.955)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
    return Path(out_path)


def is_study(directory: Path) -> bool:
    from dcpo_cli.run.study import SETTINGS_FILE

    return (Path(directory) / SETTINGS_FILE).is_file()
