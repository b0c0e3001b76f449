"""A step's inputs for `dcpo run`: its rollouts and their scores, from a given model, with
the stage times of each step (`StepTiming`). Used by the loop itself and by the generation
worker of a lagged run (overlap.py)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dcpo_cli.console import err
from dcpo_cli.files import run_layout
from dcpo_cli.run.checks import RunSettings
from dcpo_cli.run.config import refills
from dcpo_cli.run.resident import ResidentEngine, ResidentPolicy


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


class Sampler:
    """A step's inputs: its rollouts (DAPO's refill rounds too) and their scores, from a given
    model, each stage skipped when its file exists. The loop's own (one process, or rank 0
    under torchrun), or a generation worker's (`--max-staleness`, overlap.py)."""

    def __init__(self, run_dir: Path, settings: RunSettings, prompts: Path,
                 engines: ResidentEngine) -> None:
        self.run_dir, self.settings, self.prompts = run_dir, settings, prompts
        self.engines = engines
        self.refill = refills(settings.config)

    def step_inputs(self, step: int, model: Any, timing: StepTiming,
                    policy: ResidentPolicy | None = None) -> list[Path]:
        folder = run_layout.step_dir(self.run_dir, step)
        folder.mkdir(parents=True, exist_ok=True)
        if not self.refill:
            return [self.sample(step, 0, run_layout.rollouts_file(folder),
                                run_layout.scored_file(folder), model, timing=timing,
                                policy=policy)]
        # DAPO's dynamic sampling, as examples/tiny_loop.sh does it with ALGO=dapo: rounds
        # until --target-prompts groups have mixed outcomes, or loop.max_rounds are done
        from dcpo_cli.files.contracts import read_metadata

        scored, kept = [], 0
        target = self.settings.train.target_prompts or self.settings.rollout.batch_size
        rounds = self.settings.loop.max_rounds
        for round_index in range(rounds):
            if kept >= target:
                break
            scored.append(self.sample(step, round_index,
                                      run_layout.rollouts_file(folder, round_index),
                                      run_layout.scored_file(folder, round_index), model,
                                      timing=timing, policy=policy))
            kept += read_metadata(scored[-1])["mixed_groups"]
        if kept < target:
            err.print(f"warning: step {step} kept {kept} of {target} groups after {rounds} "
                      "rounds; training on those", highlight=False)
        return scored

    def sample(self, step: int, round_index: int, rollouts: Path, scored: Path, model: Any, *,
               timing: StepTiming, policy: ResidentPolicy | None) -> Path:
        """One rollout round of `step`, scored (each stage skipped when its file exists)."""
        from dcpo_cli.files.model_source import resolve_model
        from dcpo_cli.stages.rollout import run_rollout
        from dcpo_cli.stages.score import run_score

        if not rollouts.is_file():
            local = resolve_model(model).path
            options = dataclasses.replace(self.settings.rollout, round=round_index)
            summary = run_rollout(model, self.prompts, step, rollouts, options,
                                  engine=self.engines.lazy(local, policy),
                                  engine_settings=self.settings.engine)
            timing.generate = (timing.generate or 0.0) + summary.seconds
        if not scored.is_file():
            timing.score = (timing.score or 0.0) + run_score([rollouts], scored,
                                                             self.settings.score).seconds
        return scored
