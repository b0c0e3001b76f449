"""What `dcpo run` keeps loaded between stages, and the one place that owns it: the trained
policy (model, optimizer, RNG) and the generation engine, with the checks that make them
stand in for the files.

The resident policy replaces loading a checkpoint only when it is exactly what that
checkpoint holds: it was saved by the same process into that directory, and the directory's
trainer state is still the one it wrote. The RNG is snapshotted right after the save, so
the next train-step starts from the RNG state the shell loop would restore from the
checkpoint, whatever the rollout, scoring and eval in between drew.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcpo_cli.console import out
from dcpo_cli.files.checkpoint import read_trainer_state, restore_rng, rng_snapshot


@dataclass
class ResidentPolicy:
    """A train-step's updated policy, kept in memory, and the checkpoint it equals."""

    policy: Any  # train.step.Policy
    checkpoint: Path  # resolved
    trainer_state: dict[str, Any]  # as read back from the checkpoint
    rng: dict[str, Any]

    @classmethod
    def after_save(cls, policy: Any, checkpoint: Path) -> ResidentPolicy:
        """Call right after run_train_step wrote `checkpoint` from `policy`."""
        from dcpo_cli.parallel import distributed

        checkpoint = Path(checkpoint).resolve()
        # Under torchrun the checkpoint holds rank 0's RNG, which every rank of the next
        # train-step restores: so do the ranks here
        rng = distributed.broadcast_object(rng_snapshot())
        return cls(policy, checkpoint, read_trainer_state(checkpoint) or {}, rng)

    def holds(self, model_dir: Path) -> bool:
        model_dir = Path(model_dir).resolve()
        return model_dir == self.checkpoint and read_trainer_state(model_dir) == \
            self.trainer_state

    def take(self, model_dir: Path) -> tuple[Any, dict[str, Any]] | None:
        """train-step's `KeptPolicy`: the policy and trainer state `model_dir` holds, with the
        RNG restored as loading the checkpoint would (None: not this checkpoint)."""
        if not self.holds(model_dir):
            return None
        restore_rng(self.rng)
        return self.policy, self.trainer_state


class ResidentEngine:
    """The one generation engine of the run, holding the weights of `model_dir`: the
    rollouts' and evaluations' engine alike. Stages get a `LazyEngine`, so a stage that
    finds its output already written never loads or syncs anything."""

    def __init__(self, kind: str, settings: Any, lora_rank: int | None = None,
                 server: Any = None) -> None:
        self.kind, self.settings = kind, settings
        self.server = server  # ServerAddress of --engine server (a running `dcpo serve`)
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
        if self.kind == "server":  # the server loads the checkpoint in place
            from dcpo_cli.engines import engine_options
            from dcpo_cli.files.model_source import resolve_model

            options = engine_options("server", self.settings, self.server,
                                     resolve_model(model_dir))
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
