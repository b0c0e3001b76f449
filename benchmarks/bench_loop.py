"""Benchmark one loop step five ways (a script, not a test): the shell loop (a process per
stage, as examples/tiny_loop.sh runs them), the shell loop against one resident `dcpo serve`
(SERVER=1: rollouts through the server, no engine start per step), `dcpo run` (one process,
models resident), `dcpo run --max-staleness 1` (generation for step s+1 in a worker process
while step s trains, the cores split between the two), and TRL's GRPOTrainer on the same
tiny model, prompts, group size and token budget.

Prints per-step wall times side by side with their ratios, `dcpo run`'s step time against
its own stages' work (generation + scoring + update seconds), target <= 1.3x, and where a
step goes in `dcpo run` and in TRL: generation, scoring, the old-log-prob pass, the updates
and the rest, with the tokens each generated. Step 0 (engine and policy loading) is shown
apart from the steady-state mean of the rest.

The same work on both sides: the same prompts file, 32 prompts x 8 responses of at most 48
new tokens sampled at temperature 1 (no top-k/top-p), fp32, the same torch threads (one
process), 4 AdamW updates of 64 responses per step (one forward/backward each), no KL
reference model, weight decay 0.1, gradient clipping at 1, no gradient checkpointing. What
differs by design: TRL generates the 256 responses in one `generate` batch (dcpo's hf engine
in token-budget batches: 2 here), computes old log-probs for all 4 mini-batches (dcpo
reuses the first update's forward: 3) and saves nothing, while each `dcpo run` step writes
its rollouts, scored and checkpoint (weights + DCP training state) files ("other").

TRL is a benchmark-only extra, never a dependency of dcpo: install it beside the project
without touching torch, e.g. `pip install --target /tmp/trl trl accelerate --no-deps`, and
pass `--trl-path /tmp/trl` (without TRL importable, its column is skipped).

    python benchmarks/bench_loop.py [--size default|test] [--steps 3] [--repeat 1] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dcpo_cli.files import run_layout  # noqa: E402  (light: names only)

# the shell loop's defaults (examples/tiny_loop.sh)
BATCH, N, MAX_NEW_TOKENS, LR, SEED = 32, 8, 48, 2e-4, 0
# where a step's time goes; "update": the forward + backward passes and optimizer steps
STAGES = ("generate", "score", "old log-probs", "update")


@dataclass
class Measured:
    walls: list[float]  # per step
    stages: list[dict[str, float]] | None = None  # per step: seconds of each of STAGES
    tokens: list[tuple[float, int]] | None = None  # per step: mean prompt, generated tokens


def dcpo(*args: str) -> list[str]:
    return [sys.executable, "-m", "dcpo_cli", *args]


def tiny_dir(work: Path, size: str) -> Path:
    tiny = work / f"tiny-{size}"
    if not (tiny / "model").is_dir():
        subprocess.run(dcpo("tiny", "init", str(tiny), "--seed", str(SEED), "--size", size),
                       check=True, stdout=subprocess.DEVNULL)
    return tiny


def shell_steps(run: Path, tiny: Path, steps: int, nproc: int = 1,
                engine: tuple[str, ...] = ("--engine", "hf")) -> list[float]:
    """The three stage commands of tiny_loop.sh per step, each its own process (train-step
    on `nproc` processes: `--nproc-per-node`)."""
    model, times = str(tiny / "model"), []
    for step in range(steps):
        folder = run_layout.step_dir(run, step)
        folder.mkdir(parents=True, exist_ok=True)
        following = run_layout.checkpoint_dir(run, step + 1)
        started = time.perf_counter()
        for command in (
            dcpo("rollout", "--model", model, "--prompts", str(tiny / "train.parquet"),
                 "--step", str(step), "--batch-size", str(BATCH), "--n", str(N),
                 "--max-new-tokens", str(MAX_NEW_TOKENS), "--seed", str(SEED), *engine,
                 "--out", str(run_layout.rollouts_file(folder))),
            dcpo("score", str(run_layout.rollouts_file(folder)), "--out",
                 str(run_layout.scored_file(folder))),
            dcpo("train-step", "--model", model, "--scored", str(run_layout.scored_file(folder)),
                 "--state", str(run_layout.state_file(run)), "--out", str(following), "--algo",
                 "dcpo", "--lr", str(LR), "--warmup-steps", "0", "--seed", str(SEED),
                 "--metrics-log", str(run_layout.metrics_log(run)),
                 *(["--nproc-per-node", str(nproc)] if nproc > 1 else [])),
        ):
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
        model = str(following)
    return times


def served_shell_steps(run: Path, tiny: Path, steps: int) -> list[float]:
    """tiny_loop.sh with SERVER=1: the same stage commands, rollouts through one `dcpo serve`
    started before the first step (its start is outside the step times, as `dcpo run`'s
    engine load is inside step 0's: the server's start is printed apart)."""
    import signal

    run.mkdir(parents=True)
    url_file = run / "server.url"
    started = time.perf_counter()
    server = subprocess.Popen(dcpo("serve", "--model", str(tiny / "model"), "--engine", "hf",
                                   "--port", "0", "--url-file", str(url_file)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not url_file.is_file():
            if server.poll() is not None:
                raise SystemExit("dcpo serve did not start")
            time.sleep(0.05)
        print(f"dcpo serve: ready in {time.perf_counter() - started:.2f} s")
        url = url_file.read_text().strip()
        return shell_steps(run, tiny, steps, engine=("--engine", "server", "--server-url", url))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait()


def run_steps(run: Path, tiny: Path, steps: int):
    """`dcpo run` in this process (its evaluations are outside the step times); each step's
    timing, and the seconds of its old-log-prob pass (part of the update's)."""
    import shutil

    from dcpo_cli.run.checks import check_run
    from dcpo_cli.run.config import resolve
    from dcpo_cli.run.loop import run_loop
    from dcpo_cli.train import step as train_step

    run.mkdir(parents=True)
    shutil.copytree(tiny, run / "tiny")  # the loop's own layout: RUN_DIR/tiny
    config, _ = resolve(run, {"steps": steps, "eval_at": 0}, {})
    old_pass, original = [], train_step.old_logprobs

    def timed(*args, **kwargs):
        started = time.perf_counter()
        original(*args, **kwargs)
        old_pass.append(time.perf_counter() - started)

    train_step.old_logprobs = timed
    try:
        timings = run_loop(run, check_run(config, run), show_progress=False)
    finally:
        train_step.old_logprobs = original
    return timings, old_pass


def cli_run_steps(run: Path, tiny: Path, steps: int, *flags: str) -> list[float]:
    """`dcpo run FLAGS` as users start it (its evaluations off); each step's wall time, from
    its table."""
    import re
    import shutil

    run.mkdir(parents=True)
    shutil.copytree(tiny, run / "tiny")
    result = subprocess.run(dcpo("run", str(run), "--steps", str(steps), "--eval-at", "0",
                                 *flags), check=True,
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    if flags[:1] == ("--max-staleness",):
        print(" ".join(line for line in result.stderr.splitlines() if "overlapped" in line
                       or "thread" in line))
    rows = re.findall(r"^\W+(\d+)\W+([\d.]+)\W", result.stdout, flags=re.M)
    return [float(wall) for _, wall in rows][:steps]


def rollout_tokens(run: Path, steps: int) -> list[tuple[float, int]]:
    """Per step: mean prompt tokens and the number of generated tokens."""
    import pyarrow.parquet as pq

    found = []
    for step in range(steps):
        table = pq.read_table(run_layout.rollouts_file(run_layout.step_dir(run, step)),
                              columns=["prompt_token_ids", "response_token_ids"]).to_pydict()
        found.append((statistics.mean(len(p) for p in table["prompt_token_ids"]),
                      sum(len(r) for r in table["response_token_ids"])))
    return found


def trl_steps(tiny: Path, steps: int, work: Path) -> Measured | None:
    """GRPOTrainer: one generation round of BATCH prompts x N completions of up to
    MAX_NEW_TOKENS tokens, then 4 optimizer updates on it (dcpo's default mini-batching)."""
    try:
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as exc:
        print(f"TRL not importable ({exc}); its column is skipped")
        return None
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from dcpo_cli.files import contracts
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
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, max_grad_norm=1.0,
        beta=0.0, num_iterations=1,
        max_steps=steps * updates, logging_steps=10_000, save_strategy="no",
        report_to="none", seed=SEED, disable_tqdm=True, bf16=False,
        gradient_checkpointing=False)  # off, as in dcpo train-step by default

    marks: list[float] = []  # the end of each optimizer step
    stages = [dict.fromkeys(STAGES, 0.0) for _ in range(steps)]
    tokens: list[tuple[float, int]] = []

    def add(name: str, seconds: float) -> None:
        stages[min(len(marks) // updates, steps - 1)][name] += seconds

    class Clock(TrainerCallback):
        def on_pre_optimizer_step(self, *args, **kwargs):
            self.before = time.perf_counter()

        def on_optimizer_step(self, *args, **kwargs):
            add("update", time.perf_counter() - self.before)

        def on_step_end(self, *args, **kwargs):
            marks.append(time.perf_counter())

    def timed(name: str, method):
        def run(*args, **kwargs):
            started = time.perf_counter()
            result = method(*args, **kwargs)
            seconds = time.perf_counter() - started
            if name == "generate":  # prompt_ids, completion_ids, ...
                tokens.append((statistics.mean(len(p) for p in result[0]),
                               sum(len(c) for c in result[1])))
            if name == "prepare":  # generation, rewards and old log-probs: not the update's
                add("update", -seconds)
            elif name != "old log-probs" or not torch.is_grad_enabled():
                add(name, seconds)
            return result
        return run

    model = AutoModelForCausalLM.from_pretrained(tiny / "model")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    started = time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    # The stages of a step: generation (with the prompts' tokenization), the reward function,
    # the no-grad log-prob pass over the generation batch (TRL's old log-probs); the update is
    # training_step (forward + backward, less the generation round it starts with) plus the
    # gradient clipping and optimizer step.
    for name, attribute in (("generate", "_generate"), ("score", "_calculate_rewards"),
                            ("old log-probs", "_get_per_token_logps_and_entropies"),
                            ("prepare", "_generate_and_score_completions"),
                            ("update", "training_step"), ("update", "_clip_grad_norm")):
        setattr(trainer, attribute, timed(name, getattr(trainer, attribute)))
    trainer.train()
    ends = [started, *marks[updates - 1::updates]]
    walls = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return Measured(walls, stages, tokens)


def steady(values: list[float]) -> float:
    """The mean of steps 1.. (step 0 also loads engines and models), or step 0's alone."""
    return statistics.mean(values[1:] if len(values) > 1 else values)


def summary(times: list[float] | None) -> tuple[str, str]:
    if not times:
        return "-", "-"
    rest = f"{statistics.mean(times[1:]):.2f}" if len(times) > 1 else "-"
    return f"{times[0]:.2f}", rest


def measure_run(work: Path, tiny: Path, steps: int) -> Measured:
    run = work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    timings, old_pass = run_steps(run, tiny, steps)
    print("dcpo run, per step: wall / (generate + score + update):",
          ", ".join(f"{t.wall:.2f}/{t.work:.2f} = {t.wall / t.work:.2f}x" for t in timings))
    walls, work_seconds = [t.wall for t in timings], [t.work for t in timings]
    print(f"dcpo run steady state: wall {steady(walls):.2f} s for {steady(work_seconds):.2f} s "
          f"of work = {steady(walls) / steady(work_seconds):.2f}x (target <= 1.3x)")
    stages = [{"generate": t.generate or 0.0, "score": t.score or 0.0, "old log-probs": old,
               "update": (t.train or 0.0) - old} for t, old in zip(timings, old_pass,
                                                                    strict=True)]
    return Measured(walls, stages, rollout_tokens(run, steps))


def stage_table(results: dict[str, Measured]):
    """Steady-state seconds of each stage side by side; "other": the rest of the step (files,
    checkpoint and Parquet writes, weight sync, the trainer's own bookkeeping)."""
    from rich.table import Table

    broken = {k: m for k, m in results.items() if m.stages}
    table = Table(title="where a step goes (mean of steps 1..)")
    table.add_column("")
    for name in broken:
        table.add_column(f"{name} s", justify="right")
    for stage in STAGES:
        table.add_row(stage, *(f"{steady([s[stage] for s in m.stages]):.3f}"
                               for m in broken.values()))
    table.add_row("other", *(f"{steady(m.walls) - steady([sum(s.values()) for s in m.stages]):.3f}"
                             for m in broken.values()))
    table.add_row("step", *(f"{steady(m.walls):.3f}" for m in broken.values()))
    table.add_row("mean prompt tokens", *(f"{steady([t[0] for t in m.tokens]):.1f}"
                                          for m in broken.values()))
    table.add_row("generated tokens", *(f"{steady([t[1] for t in m.tokens]):.0f}"
                                        for m in broken.values()))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="default", choices=["default", "test"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dcpo-bench-loop"))
    parser.add_argument("--trl-path", type=Path, default=None,
                        help="A folder with TRL installed (pip install --target ...).")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["shell", "served", "run", "lag1", "trl", "run2", "shell2"])
    parser.add_argument("--repeat", type=int, default=1,
                        help="Measure each R times (alternating the order) and show each one's "
                        "fastest: on a shared machine, the closest to what the code costs.")
    args = parser.parse_args()
    if args.trl_path:
        sys.path.insert(0, str(args.trl_path))
    args.work.mkdir(parents=True, exist_ok=True)
    tiny = tiny_dir(args.work, args.size)
    measures = {"run": ("dcpo run", lambda stamp: measure_run(args.work, tiny, args.steps)),
                "shell": ("shell loop", lambda stamp: Measured(
                    shell_steps(args.work / f"shell-{stamp}", tiny, args.steps))),
                "served": ("shell loop + dcpo serve", lambda stamp: Measured(
                    served_shell_steps(args.work / f"served-{stamp}", tiny, args.steps))),
                "trl": ("TRL GRPOTrainer", lambda stamp: trl_steps(tiny, args.steps, args.work)),
                # 2 processes: dcpo run on 2 ranks against the shell loop with train-step on 2
                # generation for step s+1 in a worker process while step s trains
                "lag1": ("dcpo run --max-staleness 1", lambda stamp: Measured(
                    cli_run_steps(args.work / f"lag1-{stamp}", tiny, args.steps,
                                  "--max-staleness", "1"))),
                "run2": ("dcpo run --nproc-per-node 2", lambda stamp: Measured(
                    cli_run_steps(args.work / f"run2-{stamp}", tiny, args.steps,
                                  "--nproc-per-node", "2"))),
                "shell2": ("shell loop, train-step --nproc-per-node 2", lambda stamp: Measured(
                    shell_steps(args.work / f"shell2-{stamp}", tiny, args.steps, 2)))}
    order = [key for key in measures if key not in args.skip]
    every: dict[str, list[Measured]] = {}
    for repeat in range(args.repeat):
        # the order alternates, so slow phases of a shared machine hit each in turn
        for key in order if repeat % 2 == 0 else order[::-1]:
            name, measure = measures[key]
            measured = measure(f"{time.strftime('%Y%m%d-%H%M%S')}-{repeat}")
            if measured is not None:
                every.setdefault(name, []).append(measured)
    if args.repeat > 1:
        for name, runs in every.items():
            print(f"{name}: later steps' mean per repeat:",
                  ", ".join(f"{steady(m.walls):.2f}" for m in runs), "s (the lowest is shown)")
    results = {name: min(runs, key=lambda m: steady(m.walls)) for name, runs in every.items()}
    results = dict(sorted(results.items(), key=lambda item: item[0] != "dcpo run"))

    import torch
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one loop step: tiny {args.size} model, {BATCH} prompts x {N}, "
                  f"<= {MAX_NEW_TOKENS} new tokens, {os.cpu_count()} CPU cores, "
                  f"{torch.get_num_threads()} torch threads")
    for column in ("", "step 0 s", "later steps s (mean)", "vs dcpo run (same processes)"):
        table.add_column(column, justify="right")
    for name, measured in results.items():
        # the 2-process rows are compared with dcpo run on 2 processes
        base = results.get("dcpo run --nproc-per-node 2" if "2" in name else "dcpo run")
        times = measured.walls
        first, rest = summary(times)
        ratio = "-"
        if base and len(times) > 1 and len(base.walls) > 1:
            ratio = f"{statistics.mean(times[1:]) / statistics.mean(base.walls[1:]):.2f}x"
        table.add_row(name, first, rest, ratio)
    console = Console()
    console.print(table)
    if any(m.stages for m in results.values()):
        console.print(stage_table(results))
    print(json.dumps({k: vars(v) for k, v in results.items()}, default=str))


if __name__ == "__main__":
    main()
