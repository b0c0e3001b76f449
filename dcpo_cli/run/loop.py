"""`dcpo run`: examples/tiny_loop.sh in one process, with the policy, its optimizer and the
generation engine kept loaded between stages.

Every stage is the same function the stage's command calls (`run_rollout`, `run_score`,
`run_train_step`, `run_eval`), on the same paths, so the run directory holds exactly the
files the shell loop writes and either can continue a run the other started. What the
process keeps:

- the policy: `run_train_step(..., resident=...)` continues from the policy it trained last
  instead of loading the checkpoint it just wrote (only when it is exactly that checkpoint;
  see `resident.py`), and hands the updated one back;
- the engine: after a train-step the new weights go into it in memory
  (`engine.load_weights`), instead of a fresh engine loading the checkpoint; while the
  policy trains, the engine frees what it can (`engine.release`: vLLM's KV cache on GPUs).
  A checkpoint this process did not write (after a resume) is loaded from disk as the shell
  loop would.

Under torchrun (`dcpo run --nproc-per-node N`, or a torchrun you start) the same loop runs
on every rank: the policy is sharded with FSDP2 as `train-step` shards it, each rank has
its own engine and generates its share of every generation, and rank 0 alone runs the file
stages and writes (see `colocated.py`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dcpo_cli.console import out
from dcpo_cli.errors import DcpoError
from dcpo_cli.files import run_layout
from dcpo_cli.options import LoopOptions
from dcpo_cli.run.checks import RunSettings
from dcpo_cli.run.resident import ResidentEngine, ResidentPolicy
from dcpo_cli.run.sampling import Sampler, StepTiming


def run_loop(run_dir: Path, settings: RunSettings, show_progress: bool = True
             ) -> list[StepTiming]:
    """Run (or resume) the loop of `settings` in `run_dir`; the steps' timings (rank 0's)."""
    loop = RunLoop(Path(run_dir), settings, show_progress)
    try:
        return loop.run()
    finally:
        loop.close()


class RunLoop:
    """The loop's state, explicit: the run's settings, the engine and policy kept loaded,
    and where the inputs are. `run()` reads top to bottom.

    With `train.max_staleness` K > 0 step s trains on responses sampled by the policy of
    step s - K (the base model for s <= K), and generation for step s + K runs in a worker
    process while step s trains (overlap.py): a fixed lag, so the files do not depend on
    timing and equal those of the same schedule run stage after stage."""

    def __init__(self, run_dir: Path, settings: RunSettings, show_progress: bool) -> None:
        from dcpo_cli.engines import pick_engine
        from dcpo_cli.parallel import distributed
        from dcpo_cli.run.colocated import data_parallel_part
        from dcpo_cli.trackers.session import Trackers

        self.run_dir, self.settings = run_dir, settings
        self.world = distributed.init()
        self.show_progress = show_progress and self.world.is_main
        self.kind = pick_engine(settings.rollout.engine)
        self.engines = ResidentEngine(self.kind, settings.engine, settings.train.lora_rank,
                                     settings.server_address)
        self.engines.part = data_parallel_part(settings.engine.tensor_parallel_size)
        self.policy: ResidentPolicy | None = None  # after the first train-step of this process
        # one tracker run for the whole run directory, its settings run.toml's
        self.trackers = Trackers(list(settings.loop.report_to), run_dir,
                                 run_dir.resolve().name, settings.config)
        self.base_model, prompts, self.benchmarks = self.on_leader(
            lambda: prepare_inputs(run_dir, settings.loop, settings.rollout.seed))
        self.sampler = Sampler(run_dir, settings, prompts, self.engines)
        self.lag = settings.train.max_staleness
        self.worker = None  # the generation worker of a lagged run (overlap.py)

    def run(self) -> list[StepTiming]:
        steps, every = self.settings.loop.steps, self.settings.loop.eval_every
        timings = [StepTiming(step, 0.0) for step in range(steps)]
        self.evaluate(self.base_model, run_layout.step_label(0))
        if self.lag:
            from dcpo_cli.run.overlap import GenerationWorker

            self.worker = GenerationWorker(self.run_dir, self.settings, self.sampler.prompts)
        inputs = {}
        for step in range(min(self.lag, steps)):  # sampled by the base model, before any step
            started = time.perf_counter()
            inputs[step] = self.worker.inputs(step, self.sampling_model(step), timings[step])
            timings[step].wall += time.perf_counter() - started
        for step in range(steps):
            started = time.perf_counter()
            model = self.model_of(step)  # trained now, and it samples step + lag
            if self.lag and step + self.lag < steps:  # generation ahead, while this step trains
                self.worker.submit(step + self.lag, model)
            elif not self.lag:
                inputs[step] = self.on_leader(lambda step=step, model=model: (
                    self.sampler.step_inputs(step, model, timings[step], self.policy)))
            outcome = self.train(step, inputs.pop(step), timings[step])
            if self.lag and step + self.lag < steps:
                inputs[step + self.lag] = self.worker.collect(timings[step + self.lag])
            timings[step].wall += time.perf_counter() - started
            if self.world.is_main:
                out.print(_step_line(timings[step], outcome), highlight=False)
            if every and (step + 1) % every == 0 and step + 1 < steps:
                self.evaluate(self.model_of(step + 1), run_layout.step_label(step + 1))
        self.evaluate(self.model_of(steps), run_layout.step_label(steps))
        if self.engines.loads and self.world.is_main:
            out.print(f"[dim]{self.kind} engine: {self.engines.loads} start(s), "
                      f"{self.engines.pushes} in-memory weight update(s)"
                      + (f" on each of {self.world.world_size} ranks" if self.world.sharded
                         else "") + "[/]", highlight=False)
        return timings

    def model_of(self, step: int) -> Any:
        """The model step `step` trains (the policy before it): the base or a checkpoint."""
        return self.base_model if step == 0 else run_layout.checkpoint_dir(self.run_dir, step)

    def sampling_model(self, step: int) -> Any:
        """The policy that samples step `step`'s responses: `step - lag` steps old."""
        return self.model_of(max(step - self.lag, 0))

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
        self.engines.close()
        self.trackers.close()

    def on_leader(self, work: Any) -> Any:
        """`work()` on rank 0, while the other ranks serve its generations (colocated.py)."""
        from dcpo_cli.run.colocated import on_leader

        return on_leader(work, self.engines, lambda: self.policy)

    def train(self, step: int, scored: list[Path], timing: StepTiming) -> Any:
        """Train step `step` on `scored`, from the policy it holds or the checkpoint."""
        from dcpo_cli.train.step import run_train_step

        self.engines.release()
        following = run_layout.checkpoint_dir(self.run_dir, step + 1)
        outcome = run_train_step(self.model_of(step), scored, run_layout.state_file(self.run_dir),
                                 following, self.settings.train,
                                 show_progress=self.show_progress, resident=self.policy,
                                 trackers=self.trackers)
        if outcome.policy is not None:
            self.policy = ResidentPolicy.after_save(outcome.policy, following)
            timing.train = outcome.metrics["compute_seconds"]
        return outcome

    def evaluate(self, model: Any, label: str) -> None:
        if not self.benchmarks:
            return
        from dcpo_cli.engines import pick_engine
        from dcpo_cli.evaluate.stage import run_eval
        from dcpo_cli.files.model_source import resolve_model

        shares = pick_engine(self.settings.eval.engine) == self.kind

        def work() -> None:
            local = resolve_model(model).path
            engine = self.engines.lazy(local, self.policy) if shares else None
            run_eval(model, self.benchmarks, run_layout.eval_dir(self.run_dir, label),
                     self.settings.eval, engine=engine, engine_settings=self.settings.engine,
                     trackers=self.trackers)

        self.on_leader(work)


def prepare_inputs(run_dir: Path, loop: LoopOptions, seed: int
                   ) -> tuple[Any, Path, list[str]]:
    """The base model, the prompts and the benchmarks: the tiny task built into
    RUN_DIR/tiny (as the shell loop does) unless a model and prompts are given.
    `dcpo run --nproc-per-node` calls this before it launches the ranks, so the tiny model
    is built with the same torch threads as in one process (its SFT's float sums depend
    on them)."""
    if loop.model is None:
        tiny = run_layout.tiny_dir(run_dir)
        if not (tiny / "model").is_dir():
            from dcpo_cli.tiny.build import init_tiny

            init_tiny(tiny, seed=seed, size=loop.tiny_size)
        return tiny / "model", tiny / "train.parquet", (list(loop.benchmark) or
                                                        [str(tiny / "test.parquet")])
    if loop.prompts is None:
        raise DcpoError("--model needs --prompts (the training prompts file)")
    return loop.model, Path(loop.prompts), list(loop.benchmark)


def _step_line(timing: StepTiming, outcome: Any) -> str:
    metrics = outcome.metrics
    parts = [f"step {timing.step}: {outcome.status}", f"reward {metrics.get('reward_mean', 0):.3f}",
             f"{timing.wall:.1f} s"]
    if timing.work:
        parts.append(f"(generate {timing.generate or 0:.1f} s, score {timing.score or 0:.1f} s, "
                     f"update {timing.train or 0:.1f} s)")
    return ", ".join(parts)
