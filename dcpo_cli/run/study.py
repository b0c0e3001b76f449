"""`dcpo study`: one `dcpo run` per (algorithm, seed), side by side, resumable as a whole.

The study directory holds:

- `study.json`: the study's algorithms, seeds and run settings (the `dcpo run` settings
  flags, launch included, and --set values it was given), written before the first run
  starts; a re-run reads it, so it needs no flags, and one that asks for other settings is
  refused;
- `<algo>-s<seed>/`: a `dcpo run` directory: the study writes its run.toml, then starts
  `dcpo run <algo>-s<seed>` with no settings flags, so any of them can be resumed,
  reported or compared on its own; one whose run.toml differs from the study's settings in
  any field (steps and trackers aside) is refused;
- `logs/<algo>-s<seed>.log`: each run's output, appended by every attempt;
- `wall_seconds.json`: each run's wall time, summed over its attempts (updated while it runs,
  so a killed study loses at most a few seconds of it).

A re-run skips the finished runs (their last checkpoint and final evaluation are written)
and restarts the others with the same `dcpo run` command, which resumes them. `--jobs J`
runs J at once; each then gets cores / J torch threads (OMP_NUM_THREADS, unless set). The
study process waits on its runs: a run is killed with it (SIGKILL included, through the
parent-death signal on Linux), so a re-run never finds one still going. Torch-free.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError
from dcpo_cli.files import run_layout
from dcpo_cli.parallel.processes import cores as count_cores
from dcpo_cli.parallel.processes import die_with_parent
from dcpo_cli.run.config import (
    CHANGEABLE,
    Config,
    first_difference,
    flag_of,
    new_config,
    parse_set,
    read_config,
    show,
    write_config,
)

SETTINGS_FILE = "study.json"
WALL_FILE = "wall_seconds.json"
LOGS = "logs"
DEFAULT_SEEDS = 3
OWNED = ("algo", "seed")  # the run options the study sets per run
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class StudyRun:
    algo: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.algo}-s{self.seed}"


@dataclass
class Study:
    directory: Path
    algos: list[str]
    seeds: list[int]
    flags: dict[str, Any] = field(default_factory=dict)  # dcpo run flag -> value
    sets: dict[str, Any] = field(default_factory=dict)  # "section.field" -> value (--set)

    def runs(self) -> list[StudyRun]:
        """Seed by seed, every algorithm of a seed together: with --jobs the algorithms
        share the machine alike, and a study stopped early has whole seeds."""
        return [StudyRun(algo, seed) for seed in self.seeds for algo in self.algos]

    def run_dir(self, run: StudyRun) -> Path:
        return self.directory / run.name

    def given(self, run: StudyRun) -> dict[str, Any]:
        return {**self.flags, "algo": run.algo, "seed": run.seed}

    def set_pairs(self) -> dict[tuple[str, str], Any]:
        return {tuple(key.split(".", 1)): value for key, value in self.sets.items()}

    def new_config(self, run: StudyRun) -> Config:
        return new_config(self.given(run), self.set_pairs())

    def config(self, run: StudyRun) -> Config:
        """The run's configuration, the study's; a run.toml already there that differs in any
        field but the changeable ones (steps, trackers) is refused."""
        config = self.new_config(run)
        path = run_layout.config_file(self.run_dir(run))
        if path.is_file():
            stored = read_config(path)
            for section, name in CHANGEABLE:
                stored[section][name] = config[section][name]
            differs = first_difference(config, stored)
            if differs:
                section, name = differs
                raise DcpoError(f"{path}: this run was made with {section}.{name} = "
                                f"{show(stored[section][name])}, but the study's is "
                                f"{show(config[section][name])}; move the run away or use "
                                "another STUDY_DIR")
        return config

    def record(self) -> dict[str, Any]:
        return {"algos": self.algos, "seeds": self.seeds, "flags": self.flags, "set": self.sets}


def load_study(directory: Path) -> Study | None:
    path = Path(directory) / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        study = Study(Path(directory), list(data["algos"]), [int(s) for s in data["seeds"]],
                      dict(data.get("flags") or {}), dict(data.get("set") or {}))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValueError) as exc:
        raise DcpoError(f"{path}: unreadable study settings ({' '.join(str(exc).split())})"
                        ) from None
    if not study.algos or not study.seeds:
        raise DcpoError(f"{path}: no algorithms or no seeds")
    if any(seed < 0 for seed in study.seeds) or len(set(study.seeds)) != len(study.seeds):
        raise DcpoError(f"{path}: seeds must be distinct and at least 0 (got "
                        f"{_seeds(study.seeds)})")
    from dcpo_cli.options import ALGORITHMS

    unknown = [algo for algo in study.algos if algo not in ALGORITHMS]
    if unknown:
        raise DcpoError(f"{path}: unknown algorithm {unknown[0]!r}")
    return study


def save_study(study: Study) -> None:
    _write_json_atomically(study.record(), study.directory / SETTINGS_FILE)


def plan_study(directory: Path, algos: list[str] | None, seeds: int | None,
               first_seed: int | None, given: dict[str, Any], set_items: list[str]) -> Study:
    """The study to run: the stored one (study.json) with this invocation's options, all
    checked against it and against every run directory already there. Writes nothing.
    `given`: the `dcpo run` flags given (flag -> value), `set_items` the --set values."""
    from dcpo_cli.core.presets import PRESETS

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DcpoError(f"{directory}: exists and is not a directory")
    for algo in algos or []:
        if algo not in PRESETS:
            raise DcpoError(f"--algo {algo!r}: unknown algorithm; choose from "
                            f"{', '.join(PRESETS)}")
        if algos.count(algo) > 1:
            raise DcpoError(f"--algo {algo} is given twice")
    if seeds is not None and seeds < 1:
        raise DcpoError(f"--seeds must be at least 1 (got {seeds})")
    if first_seed is not None and first_seed < 0:
        raise DcpoError(f"--seed must be at least 0 (got {first_seed})")
    flags = {name: _plain(value) for name, value in given.items() if name not in OWNED}
    sets = {f"{section}.{name}": value
            for (section, name), value in parse_set(set_items).items()}
    for key in sets:
        if key in ("train.algo", "rollout.seed", "train.seed", "eval.seed"):
            raise DcpoError(f"--set {key}: the study sets it per run (--algo, --seed, --seeds)")
    stored = load_study(directory)
    seed_list = None
    if seeds is not None or first_seed is not None:
        start = first_seed if first_seed is not None else (stored.seeds[0] if stored else 0)
        count = seeds if seeds is not None else (len(stored.seeds) if stored else
                                                 DEFAULT_SEEDS)
        seed_list = list(range(start, start + count))
    if stored is None:
        if not algos:
            raise DcpoError(f"{directory}: no study here yet; name its algorithms with "
                            "--algo (e.g. --algo dcpo --algo grpo)")
        study = Study(directory, list(algos), seed_list or list(range(DEFAULT_SEEDS)),
                      flags, sets)
    else:
        path = directory / SETTINGS_FILE
        if algos and list(algos) != stored.algos:
            raise DcpoError(f"{path}: this study's algorithms are {', '.join(stored.algos)}, "
                            f"not {', '.join(algos)} (--algo); use the same or another "
                            "STUDY_DIR")
        if seed_list is not None and seed_list != stored.seeds:
            raise DcpoError(f"{path}: this study's seeds are {_seeds(stored.seeds)}, not "
                            f"{_seeds(seed_list)} (--seeds/--seed); use the same or another "
                            "STUDY_DIR")
        study = Study(directory, stored.algos, stored.seeds, {**stored.flags, **flags},
                      {**stored.sets, **sets})
        for run in study.runs():  # settings not given again are the stored ones
            before, after = stored.new_config(run), study.new_config(run)
            before["loop"]["steps"] = after["loop"]["steps"]  # --steps may change
            differs = first_difference(before, after)
            if differs:
                section, name = differs
                raise DcpoError(f"{path}: this study was made with {section}.{name} = "
                                f"{show(before[section][name])}, not "
                                f"{show(after[section][name])} "
                                f"({flag_of(section, name, flags)}); use the same settings "
                                "or another STUDY_DIR")
    for run in study.runs():
        study.config(run)  # a run directory made with other settings is refused here
    return study


def check_runs(study: Study, verbose: bool = False) -> None:
    """Every run's settings checked as `dcpo run` checks them, launch included (imports
    torch); an error names the run."""
    from dcpo_cli.run.checks import SettingError, check_run, flag_origin

    for run in study.runs():
        config = study.config(run)
        try:
            check_run(config, study.run_dir(run), verbose)
        except SettingError as exc:
            error = exc.worded(flag_origin(study.flags, study.set_pairs()), None)
            raise DcpoError(f"{run.name}: {error}") from None


def is_finished(run_dir: Path, config: Config) -> bool:
    """Whether `dcpo run` has nothing left to do: run.toml asks for these steps, the last
    checkpoint is complete and the final evaluation written (when the run evaluates)."""
    steps = config["loop"]["steps"]
    path = run_layout.config_file(run_dir)
    if not path.is_file() or read_config(path)["loop"]["steps"] != steps:
        return False
    if not (run_layout.checkpoint_dir(run_dir, steps) / "trainer_state.json").is_file():
        return False
    evaluates = config["loop"]["model"] is None or bool(config["loop"]["benchmark"])
    summary = run_layout.eval_dir(run_dir, run_layout.step_label(steps)) / "summary.json"
    return summary.is_file() or not evaluates


def steps_done(run_dir: Path) -> tuple[int, float | None]:
    """Steps trained (distinct steps in metrics.jsonl) and the last one's reward; a line
    being written (no newline yet) is not counted."""
    try:
        text = run_layout.metrics_log(run_dir).read_text()
    except (OSError, UnicodeDecodeError):
        return 0, None
    steps, reward = set(), None
    for line in text.split("\n")[:-1]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            steps.add(record["step"])
            reward = record.get("reward_mean", reward)
    return len(steps), reward


def thread_env(jobs: int, processes_per_run: int = 1) -> dict[str, str]:
    """The environment of a run when `jobs` run at once: the cores shared out, each run's
    processes (torchrun ranks) taking their part, unless the user set the variables."""
    env = dict(os.environ)
    if jobs > 1:
        cores = count_cores()
        threads = str(max(1, cores // (jobs * max(1, processes_per_run))))
        for name in THREAD_VARIABLES:
            env.setdefault(name, threads)
    return env


@dataclass
class Outcome:
    run: StudyRun
    status: str  # "finished", "already finished" or "failed"
    code: int = 0
    steps: int = 0
    seconds: float | None = None  # this invocation's wall time for the run
    log: Path | None = None


def execute(study: Study, passed: list[str], jobs: int = 1, poll: float = 0.5
            ) -> list[Outcome]:
    """Run every unfinished run of the study (`dcpo run RUN_DIR` with the flags `passed`,
    after writing its run.toml), `jobs` at once, with a progress display; returns one
    outcome per run."""
    from dcpo_cli.console import progress

    configs = {run: study.config(run) for run in study.runs()}
    pending = [run for run in study.runs() if not is_finished(study.run_dir(run), configs[run])]
    launch = next(iter(configs.values()))["launch"]
    processes_per_run = launch["nproc_per_node"] or 1
    outcomes = {run: Outcome(run, "already finished", steps=configs[run]["loop"]["steps"])
                for run in study.runs() if run not in pending}
    save_study(study)
    (study.directory / LOGS).mkdir(parents=True, exist_ok=True)
    wall = _read_wall(study.directory)
    env = thread_env(jobs, processes_per_run)
    active: dict[StudyRun, tuple[subprocess.Popen, float, float]] = {}
    total_steps = sum(c["loop"]["steps"] for c in configs.values())
    saved = time.monotonic()
    with progress() as bar:
        overall = bar.add_task(f"study {study.directory.name}", total=total_steps, info="")
        tasks = {run: bar.add_task(f"  {run.name}", total=configs[run]["loop"]["steps"],
                                   info="waiting" if run in pending else "done",
                                   completed=configs[run]["loop"]["steps"]
                                   if run not in pending else 0, visible=True)
                 for run in study.runs()}
        try:
            while pending or active:
                while pending and len(active) < max(1, jobs):
                    run = pending.pop(0)
                    log = study.directory / LOGS / f"{run.name}.log"
                    write_config(configs[run], run_layout.config_file(study.run_dir(run)))
                    command = python_command(study.run_dir(run), passed)
                    active[run] = (_start(command, log, env), time.monotonic(),
                                   wall.get(run.name, 0.0))
                    outcomes[run] = Outcome(run, "running", log=log)
                for run, (process, started, before) in list(active.items()):
                    code = process.poll()
                    elapsed = time.monotonic() - started
                    wall[run.name] = before + elapsed
                    done, reward = steps_done(study.run_dir(run))
                    steps = configs[run]["loop"]["steps"]
                    info = "final eval" if done >= steps else (
                        f"reward {reward:.3f}" if isinstance(reward, (int, float)) else "")
                    if code is not None:
                        del active[run]
                        outcomes[run].status = "finished" if code == 0 else "failed"
                        outcomes[run].code, outcomes[run].seconds = code, elapsed
                        info = "done" if code == 0 else f"failed (exit {code})"
                    outcomes[run].steps = done
                    bar.update(tasks[run], completed=done, info=info)
                bar.update(overall, completed=sum(
                    o.steps for o in outcomes.values()))
                if time.monotonic() - saved > 5 or not active:
                    _write_json_atomically(wall, study.directory / WALL_FILE)
                    saved = time.monotonic()
                if active:
                    time.sleep(poll)
        finally:
            for process, _, _ in active.values():  # interrupted: the runs stop with us
                process.terminate()
            for process, _, _ in active.values():
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
            _write_json_atomically(wall, study.directory / WALL_FILE)
    return [outcomes[run] for run in study.runs()]


def read_wall(directory: Path) -> dict[str, float]:
    return _read_wall(Path(directory))


def _read_wall(directory: Path) -> dict[str, float]:
    try:
        data = json.loads((directory / WALL_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))} \
        if isinstance(data, dict) else {}


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "a") as handle:
        handle.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n")
        handle.flush()
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


def _write_json_atomically(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def python_command(run_dir: Path, tokens: list[str]) -> list[str]:
    """`dcpo run RUN_DIR TOKENS` with this interpreter (the study's own environment)."""
    return [sys.executable, "-m", "dcpo_cli", "run", str(run_dir), *tokens]
