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

import dataclasses
import gc
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcpo_cli.console import err, out
from dcpo_cli.errors import DcpoError
from dcpo_cli.files import run_layout
from dcpo_cli.run.config import Config, refills, stage_options


@dataclass
class StepTiming:
    """One loop step's wall time and its stages' own work (None: the stage was skipped)."""

    step: int
    wall: float
    generate: float | None = None
    score: float | None = None
    train: float | None = None  # compute_seconds of the update (no loading, no saving)

    @property
    def work(self) -> float:
        return sum(x for x in (self.generate, self.score, self.train) if x is not None)


class ResidentEngine:
    """The one generation engine of the run, holding the weights of `model_dir`: the
    rollouts' and evaluations' engine alike. Stages get a `LazyEngine`, so a stage that
    finds its output already written never loads or syncs anything."""

    def __init__(self, kind: str, settings: Any, lora_rank: int | None = None) -> None:
        self.kind, self.settings = kind, settings
        self.lora_rank = lora_rank  # LoRA training: vLLM must start with LoRA on
        self.engine: Any = None
        self.model_dir: Path | None = None
        self.pushes = 0  # in-memory weight updates
        self.loads = 0  # engines started from a model directory
        self.part = (0, 1)  # this rank's share of each generation (colocated.py)

    def lazy(self, model_dir: Path, resident: Any) -> Any:
        from dcpo_cli.parallel import distributed

        if distributed.world().sharded:
            from dcpo_cli.run.colocated import LeaderEngine

            return LeaderEngine(self, model_dir, resident)
        return LazyEngine(self, model_dir, resident)

    def holding(self, model_dir: Path, resident: Any) -> Any:
        from dcpo_cli.engines import load_engine

        model_dir = Path(model_dir).resolve()
        if self.engine is not None and self.model_dir == model_dir:
            return self.engine
        if self.engine is not None and self._takes_adapter(model_dir):
            # LoRA: the engine keeps its base and takes the new adapter from the checkpoint
            self.engine.use_adapter(model_dir)
            self.model_dir = model_dir
            self.pushes += 1
            return self.engine
        if (self.engine is not None and resident is not None and resident.holds(model_dir)
                and callable(getattr(self.engine, "load_weights", None))):
            from dcpo_cli.parallel.fsdp import full_weights

            self.engine.load_weights(full_weights(resident.policy.model))
            self.model_dir = model_dir
            self.pushes += 1
            return self.engine
        if self.engine is not None:
            # after a resume, a new engine loads the checkpoint, as `dcpo rollout` would
            self.close()
            out.print(f"[dim]loading a new {self.kind} engine from {model_dir}[/]",
                      highlight=False)
        from dcpo_cli.parallel import distributed

        options = self.settings.options_for(self.kind)
        if self.kind == "vllm":
            options["resident"] = True  # sleeps while the policy trains (GPUs)
            if self.lora_rank:
                options["lora_rank"] = self.lora_rank
            # under torchrun: in this rank's process, one engine per tensor-parallel group
            options["colocated"] = distributed.world().sharded
        self.engine = load_engine(self.kind, model_dir, **options)
        self.model_dir = model_dir
        self.loads += 1
        return self.engine

    def _takes_adapter(self, model_dir: Path) -> bool:
        """`model_dir` is a LoRA checkpoint of the base the engine holds."""
        from dcpo_cli.files import lora_adapter

        if not lora_adapter.is_adapter(model_dir) or not callable(
                getattr(self.engine, "use_adapter", None)):
            return False
        return (Path(self.engine.base_path).resolve()
                == lora_adapter.base_source(model_dir).path.resolve())

    def release(self) -> None:
        """Before a train-step: let the engine free memory the training needs (`release`,
        optional like `load_weights`: an engine without it keeps what it holds)."""
        release = getattr(self.engine, "release", None)
        if callable(release):
            release()

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if callable(close):
            close()
        self.engine, self.model_dir = None, None
        gc.collect()


class LazyEngine:
    """Stands for the engine holding `model_dir`; made real on first use."""

    def __init__(self, owner: ResidentEngine, model_dir: Path, resident: Any) -> None:
        self._owner, self._model_dir, self._resident = owner, model_dir, resident

    def __getattr__(self, name: str) -> Any:
        return getattr(self._owner.holding(self._model_dir, self._resident), name)


def _refuse_server(engine: str) -> None:
    from dcpo_cli.engines import pick_engine

    if pick_engine(engine) == "server":
        raise DcpoError("engine = server: dcpo run keeps its own engine loaded (--engine "
                        "server is for dcpo rollout and dcpo eval)")


def check_config(run_dir: Path, config: Config, verbose: bool = False,
                 source: Path | None = None) -> tuple:
    """Every stage's options from `config`, checked (before anything is written). With
    `source` (the run.toml the values were read from) an error names its table and field
    rather than the command-line flag the stages' checks speak of."""
    from dcpo_cli.engines import pick_engine
    from dcpo_cli.train.step import resolve_algo

    sections = ("rollout", "score", "train", "eval", "engine")
    fixed = {"train": {"metrics_log": run_layout.metrics_log(run_dir)},
             "engine": {"verbose": verbose}}
    options = tuple(stage_options(config, name, **fixed.get(name, {})) for name in sections)
    checks = [(name, item.check) for name, item in zip(sections, options, strict=True)]
    checks += [("train", lambda: resolve_algo(options[2])),  # settings the engine cannot take:
               ("engine", lambda: options[4].options_for(pick_engine(options[0].engine))),
               ("rollout", lambda: _refuse_server(options[0].engine)),
               ("eval", lambda: _refuse_server(options[3].engine)),
               ("loop", lambda: _check_loop(config["loop"]))]
    if options[2].lora_rank is not None:
        checks.append(("train", lambda: check_lora_targets(config["loop"],
                                                           options[2].lora_target_modules)))
    for section, check in checks:
        try:
            check()
        except DcpoError as exc:
            if source is None:
                raise
            fields = str(exc).removeprefix(f"{section}.")
            fields = re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"),
                            fields)
            raise DcpoError(f"{source}: [{section}] {fields}") from None
    return options


def _check_loop(loop: dict) -> None:
    from dcpo_cli.options import report_to

    report_to(loop["report_to"])
    if loop["max_rounds"] < 1:
        raise DcpoError("loop.max_rounds must be at least 1")
    if loop["model"] is not None and loop["prompts"] is None:
        raise DcpoError("--model needs --prompts (the training prompts file)")


def check_lora_targets(loop: dict[str, Any], targets: str) -> None:
    """--lora-target-modules against the run's model, before anything is written: its
    architecture built on the meta device (no weights read; the tiny one from its size)."""
    import torch

    from dcpo_cli.files import lora_adapter
    from dcpo_cli.policy import lora

    if lora.target_list(targets) == lora.ALL_LINEAR:
        return
    with torch.device("meta"):
        if loop["model"] is None:
            from dcpo_cli.tiny.build import CONFIGS
            from dcpo_cli.tiny.model import build_model, build_tokenizer

            model, name = build_model(build_tokenizer(), CONFIGS[loop["tiny_size"]].model), \
                "the tiny model"
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            from dcpo_cli.files.model_source import resolve_model

            source = resolve_model(loop["model"])
            path = source.path
            if lora_adapter.is_adapter(path):
                path = lora_adapter.base_source(path).path
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
            name = loop["model"]
    lora.check_targets(model, targets, name)


def run_loop(run_dir: Path, config: Config, show_progress: bool = True,
             verbose: bool = False) -> list[StepTiming]:
    """Run (or resume) the loop of `config` in `run_dir`; the steps' timings (rank 0's)."""
    from dcpo_cli.engines import pick_engine
    from dcpo_cli.evaluate.stage import run_eval
    from dcpo_cli.files.model_source import resolve_model
    from dcpo_cli.options import report_to
    from dcpo_cli.parallel import distributed
    from dcpo_cli.run.colocated import check_world, data_parallel_part, on_leader
    from dcpo_cli.stages.rollout import run_rollout
    from dcpo_cli.stages.score import run_score
    from dcpo_cli.trackers.session import Trackers
    from dcpo_cli.train.step import run_train_step

    run_dir = Path(run_dir)
    loop = config["loop"]
    rollout_options, score_options, train_options, eval_options, engine_settings = \
        check_config(run_dir, config, verbose)
    world = distributed.init()
    main = world.is_main
    if world.sharded:
        check_world(world.world_size, engine_settings.tensor_parallel_size,
                    rollout_options.batch_size, rollout_options.n,
                    train_options.mini_batch_size)
    kind = pick_engine(rollout_options.engine)
    engines = ResidentEngine(kind, engine_settings, train_options.lora_rank)
    engines.part = data_parallel_part(engine_settings.tensor_parallel_size)
    resident = None
    # one tracker run for the whole run directory, its settings run.toml's
    trackers = Trackers(report_to(loop["report_to"]), run_dir, run_dir.resolve().name, config)

    def leader(work: Any) -> Any:  # rank 0 works, the others serve its generations
        return on_leader(work, engines, lambda: resident)

    base_model, prompts, benchmarks = leader(lambda: prepare_inputs(run_dir, loop,
                                                             rollout_options.seed))
    eval_shares = pick_engine(eval_options.engine) == kind

    def evaluate(model: Any, label: str) -> None:
        if not benchmarks:
            return

        def work() -> None:
            local = resolve_model(model).path
            engine = engines.lazy(local, resident) if eval_shares else None
            run_eval(model, benchmarks, run_layout.eval_dir(run_dir, label), eval_options,
                     engine=engine, engine_settings=engine_settings,
                     trackers=trackers)

        leader(work)

    def sample(step: int, round_index: int, rollouts: Path, scored: Path, model: Any,
               timing: StepTiming) -> Path:
        """One rollout round of `step`, scored (each stage skipped when its file exists)."""
        if not rollouts.is_file():
            local = resolve_model(model).path
            options = dataclasses.replace(rollout_options, round=round_index)
            summary = run_rollout(model, prompts, step, rollouts, options,
                                  engine=engines.lazy(local, resident),
                                  engine_settings=engine_settings)
            timing.generate = (timing.generate or 0.0) + summary.seconds
        if not scored.is_file():
            timing.score = (timing.score or 0.0) + run_score([rollouts], scored,
                                                             score_options).seconds
        return scored

    def sample_rounds(step: int, folder: Path, model: Any, timing: StepTiming) -> list[Path]:
        """DAPO's dynamic sampling, as examples/tiny_loop.sh does it with ALGO=dapo: rounds
        until --target-prompts groups have mixed outcomes, or loop.max_rounds are done."""
        from dcpo_cli.files.contracts import read_metadata

        scored, kept = [], 0
        target = train_options.target_prompts or rollout_options.batch_size
        for round_index in range(loop["max_rounds"]):
            if kept >= target:
                break
            scored.append(sample(step, round_index, run_layout.rollouts_file(folder, round_index),
                                 run_layout.scored_file(folder, round_index), model, timing))
            kept += read_metadata(scored[-1])["mixed_groups"]
        if kept < target:
            err.print(f"warning: step {step} kept {kept} of {target} groups after "
                      f"{loop['max_rounds']} rounds; training on those", highlight=False)
        return scored

    def step_inputs(step: int, folder: Path, model: Any, timing: StepTiming) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        if refill:
            return sample_rounds(step, folder, model, timing)
        return [sample(step, 0, run_layout.rollouts_file(folder), run_layout.scored_file(folder),
                       model, timing)]

    refill = refills(config)
    steps, every = loop["steps"], loop["eval_every"]
    model: Any = base_model
    timings = []
    try:
        evaluate(base_model, run_layout.step_label(0))
        for step in range(steps):
            started = time.perf_counter()
            timing = StepTiming(step, 0.0)
            following = run_layout.checkpoint_dir(run_dir, step + 1)
            scored = leader(lambda step=step, timing=timing, model=model: step_inputs(
                step, run_layout.step_dir(run_dir, step), model, timing))
            engines.release()
            outcome = run_train_step(model, scored, run_layout.state_file(run_dir), following,
                                     train_options, show_progress=show_progress and main,
                                     resident=resident, trackers=trackers)
            if outcome.policy is not None:
                from dcpo_cli.run.resident import ResidentPolicy

                resident = ResidentPolicy.after_save(outcome.policy, following)
                timing.train = outcome.metrics["compute_seconds"]
            model = following
            timing.wall = time.perf_counter() - started
            timings.append(timing)
            if main:
                out.print(_step_line(timing, outcome), highlight=False)
            if every and (step + 1) % every == 0 and step + 1 < steps:
                evaluate(model, run_layout.step_label(step + 1))
        evaluate(model, run_layout.step_label(steps))
        if engines.loads and main:
            out.print(f"[dim]{kind} engine: {engines.loads} start(s), {engines.pushes} "
                      "in-memory weight update(s)"
                      + (f" on each of {world.world_size} ranks" if world.sharded else "")
                      + "[/]", highlight=False)
    finally:
        engines.close()
        trackers.close()
    return timings


def prepare_inputs(run_dir: Path, loop: dict[str, Any], seed: int
                   ) -> tuple[Any, Path, list[str]]:
    """The base model, the prompts and the benchmarks: the tiny task built into
    RUN_DIR/tiny (as the shell loop does) unless a model and prompts are given.
    `dcpo run --nproc-per-node` calls this before it launches the ranks, so the tiny model
    is built with the same torch threads as in one process (its SFT's float sums depend
    on them)."""
    if loop["model"] is None:
        tiny = run_layout.tiny_dir(run_dir)
        if not (tiny / "model").is_dir():
            from dcpo_cli.tiny.build import init_tiny

            init_tiny(tiny, seed=seed, size=loop["tiny_size"])
        return tiny / "model", tiny / "train.parquet", (list(loop["benchmark"]) or
                                                        [str(tiny / "test.parquet")])
    if loop["prompts"] is None:
        raise DcpoError("--model needs --prompts (the training prompts file)")
    return loop["model"], Path(loop["prompts"]), list(loop["benchmark"])


def _step_line(timing: StepTiming, outcome: Any) -> str:
    metrics = outcome.metrics
    parts = [f"step {timing.step}: {outcome.status}", f"reward {metrics.get('reward_mean', 0):.3f}",
             f"{timing.wall:.1f} s"]
    if timing.work:
        parts.append(f"(generate {timing.generate or 0:.1f} s, score {timing.score or 0:.1f} s, "
                     f"update {timing.train or 0:.1f} s)")
    return ", ".join(parts)
