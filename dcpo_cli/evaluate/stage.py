"""`dcpo eval` as a stage: generate greedy and sampled answers, verify them, write the
samples and the summary (docs/design.md 1.8).

Outputs, under the output directory:
- `<benchmark>/samples.parquet` (contract `contracts.EVAL_SAMPLE_COLUMNS`, plus the gold
  `answer`): the greedy response has `sample_index` -1 and `greedy` true, the K sampled ones
  `sample_index` 0..K-1 and `greedy` false, so (prompt_id, sample_index) is a unique key.
  A missing extraction is stored as "". The metadata holds the options and the model
  fingerprint, which is how a re-run with the same options skips the benchmark;
- `summary.json`: `{"<benchmark>": {"problems": P, "avg@1": .., "avg@K": .., "pass@K": ..,
  "maj@K": ..}, ..., "average": {...}}` in percent, plus `"_model"`: the model as given, its
  Hub id and commit (null for a local directory) and its fingerprint;
- `options.json`: the options of the run that wrote the summary.

Generation goes through the same engines as `dcpo rollout`, and verification through the
reward path of `dcpo score` (`rewards.verify_batch`: `rewards.judge` with the default reward,
math-verify).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from dcpo_cli.engines.settings import EngineSettings, ServerAddress
from dcpo_cli.errors import DcpoError
from dcpo_cli.evaluate import sets as eval_sets
from dcpo_cli.evaluate.metrics import Sample, average_metrics, benchmark_metrics
from dcpo_cli.files import contracts
from dcpo_cli.files.model_source import ModelSource, model_identity, resolve_model
from dcpo_cli.options import EvalOptions

GREEDY_INDEX = -1
SAMPLES_FILE = "samples.parquet"
SAMPLES_SCHEMA = pa.schema([*((name, kind) for name, kind in contracts.EVAL_SAMPLE_COLUMNS.items()),
                            ("answer", pa.string())])


@dataclass
class BenchmarkResult:
    name: str
    metrics: dict[str, float | int]
    samples_path: Path
    reused: bool
    truncated: float  # percent of responses that hit --max-new-tokens
    seconds: float


def model_fingerprint(model: str | Path | ModelSource) -> str:
    """Identifies the model cheaply (`model_source.model_identity`); an eval folder inside
    the model directory does not count (only its top-level files do)."""
    return model_identity(model if isinstance(model, ModelSource) else Path(model))


def run_eval(model: str | Path | ModelSource, specs: list[str], out: Path, options: EvalOptions,
             data_dir: Path | None = None, *, engine: Any = None,
             engine_settings: EngineSettings | None = None,
             server: ServerAddress | None = None, trackers: Any = None
             ) -> dict[str, BenchmarkResult]:
    """Evaluate `model` (a directory or a Hub id[@revision]) on each benchmark spec, write the
    outputs, return the results.

    `engine` replaces the real one (tests pass a scripted engine); otherwise the engine is
    loaded once, with `engine_settings`, only when some benchmark is not already done. With
    `--engine server` the `dcpo serve` at `server` generates: the samples record its engine
    and settings, so they are interchangeable with that engine's in-process samples.
    `trackers` (`trackers.session.Trackers`) get the summary once written, at the global step
    of the checkpoint measured (0 for a model that is not a train-step checkpoint).
    """
    options.check()
    engine_settings = engine_settings or EngineSettings()
    from dcpo_cli.engines import engine_options, pick_engine

    kind = pick_engine(options.engine)
    engine_options(kind, engine_settings, server)  # a bad setting stops the run here
    generating_kind, settings_record = kind, engine_settings.record()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DcpoError(f"{out}: exists and is not a directory (--out names a folder)")
    data_dir = eval_sets.data_dir_from(data_dir)
    # load every benchmark first, so a data problem stops the run before the model loads
    datasets = [eval_sets.load_benchmark(spec, data_dir, instruction=options.instruction,
                                          instruction_in=options.instruction_in,
                                          limit=options.limit) for spec in specs]
    names = [data.name for data in datasets]
    duplicates = sorted({n for n in names if names.count(n) > 1} | {"average"} & set(names))
    if duplicates:
        raise DcpoError(f"benchmark name '{duplicates[0]}' is given twice or is reserved")
    source = resolve_model(model)
    fingerprint = model_fingerprint(source)
    if kind == "server" and engine is None:
        from dcpo_cli.engines.serve_client import server_identity

        identity = server_identity(server)  # cheap: what would generate, nothing loaded
        generating_kind, settings_record = identity["engine"], identity["engine_settings"]
    results: dict[str, BenchmarkResult] = {}
    for data in datasets:
        path = out / data.name / SAMPLES_FILE
        # the model is identified by its fingerprint, not its path, so a moved copy is reused;
        # the engine and its settings (dtype, ...) are part of what makes the samples
        # (through a server, the engine that generates there: its samples and the in-process
        # engine's are the same, so each reuses the other's; generation_server tells them apart)
        run_options = {**asdict(options), "benchmark": data.name, "data": data.fingerprint,
                       "engine_kind": generating_kind, "engine_settings": settings_record,
                       **({"engine": generating_kind} if kind == "server" else {})}
        started = time.perf_counter()
        table = _finished_samples(path, run_options, fingerprint)
        reused = table is not None
        if table is None:
            if engine is None:
                from dcpo_cli.engines import load_engine

                engine = load_engine(kind, source.path,
                                     **engine_options(kind, engine_settings, server, source))
            table = generate_samples(engine, data, options)
            inputs = [data.source] if Path(data.source).is_file() else []
            metadata = contracts.make_metadata(
                "eval_samples", "eval", options=run_options, inputs=inputs,
                extra={"benchmark": data.name, "source": data.source, **source.record(),
                       "model_fingerprint": fingerprint, "problems": len(data.rows),
                       "generation_server": getattr(engine, "server_record", None)})
            contracts.write_table(table, path, metadata)
        results[data.name] = _result(data, table, options, path, reused,
                                     time.perf_counter() - started)
    summary = write_summary(results, out, options, source)
    if trackers:
        trackers.log_eval(summary, checkpoint_step(source.path))
    return results


def checkpoint_step(model_dir: Path) -> int:
    """The global step of a train-step checkpoint (the train steps behind it); 0 else."""
    from dcpo_cli.files.checkpoint import is_checkpoint, read_trainer_state

    if not is_checkpoint(model_dir):
        return 0
    return int((read_trainer_state(model_dir) or {}).get("global_step", 0))


def _finished_samples(path: Path, run_options: dict, fingerprint: str) -> pa.Table | None:
    """The samples of an earlier run with identical options and model, else None."""
    if not path.is_file():
        return None
    metadata = contracts.read_metadata(path)
    wanted = json.loads(json.dumps(run_options, default=str))  # as stored in the metadata
    if metadata.get("options") != wanted or metadata.get("model_fingerprint") != fingerprint:
        return None
    try:
        return contracts.read_table(path, "eval_samples")
    except DcpoError:  # damaged or edited: compute it again
        return None


def generate_samples(engine: Any, data: eval_sets.BenchmarkData,
                     options: EvalOptions) -> pa.Table:
    """Greedy and/or K sampled responses for every problem, verified, as a samples table."""
    from dcpo_cli.console import progress
    from dcpo_cli.engines import SamplingSettings
    from dcpo_cli.engines.prompting import encode_prompts
    from dcpo_cli.rewards import verify_batch

    encoded = encode_prompts(engine.tokenizer, [row["prompt"] for row in data.rows],
                             chat_template=options.chat_template)
    prompt_ids = [ids for _, ids in encoded]
    runs = []  # (greedy?, settings)
    if options.greedy:
        runs.append((True, SamplingSettings(n=1, temperature=0.0, top_p=1.0, top_k=0,
                                            max_new_tokens=options.max_new_tokens,
                                            seed=options.seed)))
    if options.avg_at:
        runs.append((False, SamplingSettings(n=options.avg_at, temperature=options.temperature,
                                             top_p=options.top_p, top_k=options.top_k,
                                             max_new_tokens=options.max_new_tokens,
                                             seed=options.seed)))
    total = sum(settings.n for _, settings in runs) * len(prompt_ids)
    rows: list[dict[str, Any]] = []
    with progress() as bar:
        task = bar.add_task(f"{data.name}", total=total, info="")
        done_before = 0
        started = time.perf_counter()
        for greedy, settings in runs:
            tokens_before = sum(r["response_tokens"] for r in rows)

            def on_progress(responses: int, tokens: int, base: int = done_before,
                            base_tokens: int = tokens_before) -> None:
                rate = (base_tokens + tokens) / max(time.perf_counter() - started, 1e-9)
                bar.update(task, completed=base + responses, info=f"{rate:,.0f} tok/s")

            completions = engine.generate(prompt_ids, settings, on_progress=on_progress)
            if len(completions) != len(prompt_ids):
                raise DcpoError(f"{data.name}: the engine returned {len(completions)} result "
                                f"lists for {len(prompt_ids)} prompts")
            if any(len(group) != settings.n for group in completions):
                raise DcpoError(f"{data.name}: the engine returned a wrong number of "
                                f"responses (expected {settings.n} per prompt)")
            for row, group in zip(data.rows, completions, strict=True):
                for index, completion in enumerate(group):
                    rows.append({
                        "prompt_id": row["prompt_id"],
                        "sample_index": GREEDY_INDEX if greedy else index,
                        "greedy": greedy,
                        "response_text": completion.text,
                        "response_tokens": len(completion.token_ids),
                        "finish_reason": completion.finish_reason,
                        "answer": row["answer"],
                    })
            done_before += settings.n * len(prompt_ids)
            bar.update(task, completed=done_before)
        bar.update(task, info="verifying answers")
        verdicts = verify_batch([r["response_text"] for r in rows], [r["answer"] for r in rows])
        bar.update(task, info="")
    for row, verdict in zip(rows, verdicts, strict=True):
        row["extracted_answer"] = verdict.extracted or ""
        row["correct"] = bool(verdict.correct)
    return pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)


def samples_metrics(table: pa.Table, prompt_ids: list[str], options: EvalOptions
                    ) -> dict[str, float | int]:
    """Metrics of one benchmark from its samples table (fresh or reused alike)."""
    by_prompt: dict[str, list[dict]] = {pid: [] for pid in prompt_ids}
    for row in table.to_pylist():
        if row["prompt_id"] in by_prompt:
            by_prompt[row["prompt_id"]].append(row)
    greedy, sampled = [], []
    for pid, rows in by_prompt.items():
        greedy_rows = [r for r in rows if r["greedy"]]
        drawn = sorted((r for r in rows if not r["greedy"]), key=lambda r: r["sample_index"])
        if (len(greedy_rows) != int(options.greedy)) or len(drawn) != options.avg_at:
            raise DcpoError(f"{SAMPLES_FILE}: problem {pid} has {len(greedy_rows)} greedy and "
                            f"{len(drawn)} sampled responses, expected "
                            f"{int(options.greedy)} and {options.avg_at}")
        greedy += [_sample(r) for r in greedy_rows]
        sampled.append([_sample(r) for r in drawn])
    return benchmark_metrics(greedy if options.greedy else None,
                             sampled if options.avg_at else None, options.pass_at)


def _sample(row: dict) -> Sample:
    return Sample(row["extracted_answer"] or None, bool(row["correct"]))


def _result(data: eval_sets.BenchmarkData, table: pa.Table, options: EvalOptions, path: Path,
            reused: bool, seconds: float) -> BenchmarkResult:
    metrics = samples_metrics(table, [row["prompt_id"] for row in data.rows], options)
    reasons = table.column("finish_reason").to_pylist()
    truncated = 100.0 * reasons.count("length") / len(reasons) if reasons else 0.0
    return BenchmarkResult(data.name, metrics, path, reused, truncated, seconds)


def write_summary(results: dict[str, BenchmarkResult], out: Path, options: EvalOptions,
                  model: str | Path | ModelSource) -> dict[str, dict[str, float | int]]:
    source = resolve_model(model)
    model_record = {**source.record(), "model_fingerprint": model_fingerprint(source)}
    summary = {name: result.metrics for name, result in results.items()}
    summary["average"] = average_metrics(summary)
    # "_" keys are not benchmarks (report.load_evals skips them): which weights were measured
    contracts.write_json({**summary, "_model": model_record}, out / "summary.json")
    contracts.write_json({**asdict(options), **model_record, "benchmarks": list(results)},
                         out / "options.json")
    return summary


def summary_table(results: dict[str, BenchmarkResult], summary_path: Path | None = None):
    """A rich table: one row per benchmark plus the average, metrics in percent."""
    from rich.table import Table

    summary = {name: result.metrics for name, result in results.items()}
    average = average_metrics(summary)
    keys = [key for key in average if key != "problems"]
    title = "dcpo eval" + (f" ({summary_path})" if summary_path else "")
    table = Table(title=title)
    table.add_column("benchmark")
    table.add_column("problems", justify="right")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_column("truncated", justify="right")
    table.add_column("time", justify="right")
    for name, result in results.items():
        note = "reused" if result.reused else f"{result.seconds:.1f}s"
        table.add_row(name, str(result.metrics["problems"]),
                      *(_cell(result.metrics.get(key)) for key in keys),
                      f"{result.truncated:.1f}%", note)
    if len(results) > 1:
        table.add_row("average", str(average["problems"]),
                      *(_cell(average.get(key)) for key in keys), "", "", style="bold")
    return table


def _cell(value: Any) -> str:
    return "–" if value is None else f"{float(value):.1f}"
