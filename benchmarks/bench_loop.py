"""Benchmark one loop step three ways (a script, not a test): the shell loop (a process per
stage, as examples/tiny_loop.sh runs them), `dcpo run` (one process, models resident), and
TRL's GRPOTrainer on the same tiny model, prompts, group size and token budget.

Prints per-step wall times side by side with their ratios, and `dcpo run`'s step time
against its own stages' work (generation + scoring + update seconds), target <= 1.3x.
Step 0 (engine and policy loading) is shown apart from the steady-state mean of the rest.

TRL is a benchmark-only extra, never a dependency of dcpo: install it beside the project
without touching torch, e.g. `pip install --target /tmp/trl trl accelerate --no-deps`, and
pass `--trl-path /tmp/trl` (without TRL importable, its column is skipped).

    python benchmarks/bench_loop.py [--size default|test] [--steps 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the shell loop's defaults (examples/tiny_loop.sh)
BATCH, N, MAX_NEW_TOKENS, LR, SEED = 32, 8, 48, 2e-4, 0


def dcpo(*args: str) -> list[str]:
    return [sys.executable, "-m", "dcpo_cli", *args]


def tiny_dir(work: Path, size: str) -> Path:
    tiny = work / f"tiny-{size}"
    if not (tiny / "model").is_dir():
        subprocess.run(dcpo("tiny", "init", str(tiny), "--seed", str(SEED), "--size", size),
                       check=True, stdout=subprocess.DEVNULL)
    return tiny


def shell_steps(run: Path, tiny: Path, steps: int) -> list[float]:
    """The three stage commands of tiny_loop.sh per step, each its own process."""
    model, times = str(tiny / "model"), []
    for step in range(steps):
        folder = run / "steps" / f"{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        following = run / "ckpt" / f"step-{step + 1:06d}"
        started = time.perf_counter()
        for command in (
            dcpo("rollout", "--model", model, "--prompts", str(tiny / "train.parquet"),
                 "--step", str(step), "--batch-size", str(BATCH), "--n", str(N),
                 "--max-new-tokens", str(MAX_NEW_TOKENS), "--seed", str(SEED), "--engine",
                 "hf", "--out", str(folder / "rollouts.parquet")),
            dcpo("score", str(folder / "rollouts.parquet"), "--out",
                 str(folder / "scored.parquet")),
            dcpo("train-step", "--model", model, "--scored", str(folder / "scored.parquet"),
                 "--state", str(run / "state.json"), "--out", str(following), "--algo",
                 "dcpo", "--lr", str(LR), "--warmup-steps", "0", "--seed", str(SEED),
                 "--metrics-log", str(run / "metrics.jsonl")),
        ):
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
        model = str(following)
    return times


def run_steps(run: Path, tiny: Path, steps: int):
    """`dcpo run` in this process (its evaluations are outside the step times)."""
    import shutil

    from dcpo_cli.run_config import resolve
    from dcpo_cli.run_loop import run_loop

    run.mkdir(parents=True)
    shutil.copytree(tiny, run / "tiny")  # the loop's own layout: RUN_DIR/tiny
    config, _ = resolve(run, {"steps": steps, "eval_at": 0}, {})
    return run_loop(run, config, show_progress=False)


def trl_steps(tiny: Path, steps: int, work: Path) -> list[float] | None:
    """GRPOTrainer: one generation round of BATCH prompts x N completions of up to
    MAX_NEW_TOKENS tokens, then 4 optimizer updates on it (dcpo's default mini-batching)."""
    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as exc:
        print(f"TRL not importable ({exc}); its column is skipped")
        return None
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from dcpo_cli import contracts
    from dcpo_cli.rewards import verify_batch

    rows = contracts.read_table(tiny / "train.parquet", "prompts").to_pylist()
    dataset = Dataset.from_list([{"prompt": [dict(m) for m in r["prompt"]],
                                  "answer": r["answer"]} for r in rows])

    def reward(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(v.correct) for v in verify_batch(texts, answer)]

    updates = 4
    config = GRPOConfig(
        output_dir=str(work / "trl"), use_cpu=True, num_generations=N,
        per_device_train_batch_size=BATCH * N // updates, steps_per_generation=updates,
        max_completion_length=MAX_NEW_TOKENS, temperature=1.0, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, beta=0.0, num_iterations=1,
        max_steps=steps * updates, logging_steps=10_000, save_strategy="no",
        report_to="none", seed=SEED, disable_tqdm=True, bf16=False,
        gradient_checkpointing=False)  # off, as in dcpo train-step by default

    class Clock(TrainerCallback):
        marks: list[float] = []

        def on_step_end(self, *args, **kwargs):
            self.marks.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(tiny / "model")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    clock = Clock()
    started = time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    marks = [started, *clock.marks[updates - 1::updates]]
    return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def summary(times: list[float] | None) -> tuple[str, str]:
    if not times:
        return "-", "-"
    rest = f"{statistics.mean(times[1:]):.2f}" if len(times) > 1 else "-"
    return f"{times[0]:.2f}", rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="default", choices=["default", "test"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dcpo-bench-loop"))
    parser.add_argument("--trl-path", type=Path, default=None,
                        help="A folder with TRL installed (pip install --target ...).")
    parser.add_argument("--skip", nargs="*", default=[], choices=["shell", "run", "trl"])
    args = parser.parse_args()
    if args.trl_path:
        sys.path.insert(0, str(args.trl_path))
    args.work.mkdir(parents=True, exist_ok=True)
    tiny = tiny_dir(args.work, args.size)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, list[float] | None] = {}
    if "run" not in args.skip:
        timings = run_steps(args.work / f"run-{stamp}", tiny, args.steps)
        results["dcpo run"] = [t.wall for t in timings]
        work = [t.work for t in timings]
        print("dcpo run, per step: wall / (generate + score + update):",
              ", ".join(f"{t.wall:.2f}/{t.work:.2f} = {t.wall / t.work:.2f}x" for t in timings))
        if len(timings) > 1:
            walls = results["dcpo run"][1:]
            print(f"dcpo run steady state (steps 1..): wall {statistics.mean(walls):.2f} s"
                  f" for {statistics.mean(work[1:]):.2f} s of work = "
                  f"{sum(results['dcpo run'][1:]) / sum(work[1:]):.2f}x (target <= 1.3x)")
    if "shell" not in args.skip:
        results["shell loop"] = shell_steps(args.work / f"shell-{stamp}", tiny, args.steps)
    if "trl" not in args.skip:
        results["TRL GRPOTrainer"] = trl_steps(tiny, args.steps, args.work)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one loop step: tiny {args.size} model, {BATCH} prompts x {N}, "
                  f"<= {MAX_NEW_TOKENS} new tokens, {os.cpu_count()} CPU cores")
    for column in ("", "step 0 s", "later steps s (mean)", "vs dcpo run"):
        table.add_column(column, justify="right")
    base = results.get("dcpo run")
    for name, times in results.items():
        first, rest = summary(times)
        ratio = "-"
        if times and base and len(times) > 1 and len(base) > 1:
            ratio = f"{statistics.mean(times[1:]) / statistics.mean(base[1:]):.2f}x"
        table.add_row(name, first, rest, ratio)
    Console().print(table)
    print(json.dumps({k: v for k, v in results.items()}, default=str))


if __name__ == "__main__":
    main()
