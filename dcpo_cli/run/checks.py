"""`dcpo run`'s settings, checked once: run.toml's tables as one named object.

`check_run(config, ...)` builds every stage's options from the configuration, checks each
(and what the run needs of them together: the world size, LoRA targets against the model,
engine settings against the engine) and returns a `RunSettings`, or raises a
`SettingError` that knows its table and field, so the command line words it as the flag
that set the value and run.toml as its table entry (`SettingError.worded`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcpo_cli.engines.settings import EngineSettings, ServerAddress
from dcpo_cli.errors import DcpoError
from dcpo_cli.fields import OptionError
from dcpo_cli.files import run_layout
from dcpo_cli.options import (
    EvalOptions,
    LaunchOptions,
    LoopOptions,
    RolloutOptions,
    ScoreOptions,
    TrainOptions,
)
from dcpo_cli.run.config import FLAGS, Config, stage_options


@dataclass(frozen=True)
class RunSettings:
    """One run's settings, every table of run.toml as its options dataclass."""

    loop: LoopOptions
    launch: LaunchOptions
    rollout: RolloutOptions
    score: ScoreOptions
    train: TrainOptions
    eval: EvalOptions
    engine: EngineSettings
    server: ServerAddress  # url None: no server (its token comes from DCPO_SERVER_TOKEN)
    config: Config  # the tables as read or written (trackers record them)

    @property
    def server_address(self) -> ServerAddress | None:
        return self.server if self.server.url is not None else None

    @property
    def world_size(self) -> int:
        return (self.launch.nproc_per_node or 1) * self.launch.nnodes


class SettingError(DcpoError):
    """A run setting that fails its check: `section`, `name` (None where the check is about
    several fields) and the stage's own error."""

    def __init__(self, section: str, error: DcpoError) -> None:
        self.section, self.error = section, error
        self.name = error.name if isinstance(error, OptionError) else None
        super().__init__(str(error))

    def worded(self, origin: Callable[[str, str], str | None], source: Path | None) -> DcpoError:
        """The error as the user set the value: `origin(section, name)` is the run flag that
        set it ("--eval-at"), "--set" or None (run.toml, at `source`, or a default)."""
        if self.name is None:
            where = f"{source}: [{self.section}] " if source is not None else ""
            return DcpoError(f"{where}{self.error}")
        problem = self.error.problem
        flag = origin(self.section, self.name)
        if flag == "--set":
            return DcpoError(f"--set {self.section}.{self.name}: {problem}")
        if flag is not None:
            return DcpoError(f"{flag} {problem}")
        if source is not None:
            return self.error.in_file(source, self.section)
        return DcpoError(f"{self.section}.{self.name} {problem}")


def settings_of(config: Config, run_dir: Path, verbose: bool = False) -> RunSettings:
    import os

    fixed = {"train": {"metrics_log": run_layout.metrics_log(run_dir)},
             "engine": {"verbose": verbose},
             "server": {"token": os.environ.get("DCPO_SERVER_TOKEN")}}
    tables = {section: stage_options(config, section, **fixed.get(section, {}))
              for section in ("loop", "launch", "rollout", "score", "train", "eval", "engine",
                              "server")}
    return RunSettings(**tables, config=config)


def check_run(config: Config, run_dir: Path, verbose: bool = False,
              world_size: int | None = None) -> RunSettings:
    """The run's settings, every check passed (nothing is loaded or written). `world_size`:
    the processes this invocation trains on (default: run.toml's launch)."""
    from dcpo_cli.train.step import resolve_algo

    settings = settings_of(config, run_dir, verbose)
    checks: list[tuple[str, Callable[[], Any]]] = [
        (section, getattr(settings, section).check)
        for section in ("loop", "launch", "rollout", "score", "train", "eval", "engine")]
    checks += [("train", lambda: resolve_algo(settings.train)),
               ("rollout", lambda: _check_engine(settings, settings.rollout.engine)),
               ("eval", lambda: _check_engine(settings, settings.eval.engine))]
    if world_size is None and settings.launch.nproc_per_node is not None:
        checks.append(("launch", lambda: _check_capacity(settings.launch)))
    world = world_size or settings.world_size
    if settings.train.max_staleness and world > 1:
        checks.append(("train", _refuse_lag_on_ranks))
    if world > 1:
        from dcpo_cli.run.colocated import check_world

        checks.append(("launch", lambda: check_world(
            world, settings.engine.tensor_parallel_size, settings.rollout.batch_size,
            settings.rollout.n, settings.train.mini_batch_size)))
    if settings.train.lora_rank is not None:
        checks.append(("train", lambda: check_lora_targets(settings.loop,
                                                           settings.train.lora_target_modules)))
    for section, check in checks:
        try:
            check()
        except DcpoError as exc:
            raise SettingError(section, exc) from None
    return settings


def flag_origin(given: dict[str, Any], sets: dict[tuple[str, str], Any]
                ) -> Callable[[str, str], str | None]:
    """Who set (section, name) in this invocation: a run flag, --set, or neither."""

    def origin(section: str, name: str) -> str | None:
        if (section, name) in sets:
            return "--set"
        for flag in given:
            if (section, name) in FLAGS[flag]:
                return f"--{flag.replace('_', '-')}"
        return None

    return origin


def _check_capacity(launch: LaunchOptions) -> None:
    from dcpo_cli.parallel.launch import Launch

    Launch(launch.nproc_per_node, launch.nnodes).check_capacity()


def _check_engine(settings: RunSettings, engine: str) -> None:
    """The engine's settings fit it (a server engine needs --server-url, and its settings
    are the server's)."""
    from dcpo_cli.engines import engine_options, pick_engine

    settings.server.check()
    engine_options(pick_engine(engine), settings.engine,
                   settings.server if settings.server.url is not None else None)


def _refuse_lag_on_ranks() -> None:
    raise DcpoError("--max-staleness > 0 overlaps generation with training in one process "
                    "and its generation worker; on several processes (--nproc-per-node), "
                    "generate on other GPUs with --engine server or use --max-staleness 0")


def check_lora_targets(loop: LoopOptions, targets: str) -> None:
    """--lora-target-modules against the run's model, before anything is written: its
    architecture built on the meta device (no weights read; the tiny one from its size)."""
    import torch

    from dcpo_cli.files import lora_adapter
    from dcpo_cli.policy import lora

    if lora.target_list(targets) == lora.ALL_LINEAR:
        return
    with torch.device("meta"):
        if loop.model is None:
            from dcpo_cli.tiny.build import CONFIGS
            from dcpo_cli.tiny.model import build_model, build_tokenizer

            model, name = build_model(build_tokenizer(), CONFIGS[loop.tiny_size].model), \
                "the tiny model"
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            from dcpo_cli.files.model_source import resolve_model

            source = resolve_model(loop.model)
            path = lora_adapter.base_source(source.path).path \
                if lora_adapter.is_adapter(source.path) else source.path
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
            name = loop.model
    lora.check_targets(model, targets, name)
