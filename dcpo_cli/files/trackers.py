"""Experiment trackers (`--report-to`): the metrics of metrics.jsonl and the eval summaries,
sent to TensorBoard, Weights & Biases, Trackio or MLflow through their own libraries.

A tracker is a mirror, never the record: metrics.jsonl, metrics.json and summary.json are
written first, and a tracker that fails (not installed, not logged in, network down, raising
while logging) costs one warning line on stderr and is left alone for the rest of the
process; the step goes on and exits 0.

The shell loop runs each train-step as its own process, so the tracker run has to outlive
them: `HOME/trackers.json` (HOME: the folder of the SAS state file, i.e. the run directory)
keeps each backend's run id, and the steps already logged to it, so a resumed or re-run step
is never logged twice and the next process continues the same tracker run. Backends are
opened on the first value to log, so a step with nothing new opens no tracker run at all.

Steps: a train step is logged at its `global_step` (train steps done, the number of the
checkpoint it writes: rollout step N of the loop is global step N + 1), an evaluation at the
global step of the checkpoint it measured (0 for a model that is not a train-step
checkpoint), so `eval/step-000024` lands beside the train step that wrote ckpt/step-000024.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from dcpo_cli.options import TRACKERS

TRACKERS_FILE = "trackers.json"
TRAIN = "train"  # the stream of train steps (monotone); eval streams are "eval/<benchmark>"


def tracker_values(prefix: str, record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, named `prefix/key`: ints, floats and bools (as 0/1);
    a list of numbers (per-rank values) one value per index; None, strings and the rest left
    out (the record keeps them)."""
    values: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool):
            values[f"{prefix}/{key}"] = int(value)
        elif isinstance(value, (int, float)):
            values[f"{prefix}/{key}"] = value
        elif isinstance(value, list) and value and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            values.update({f"{prefix}/{key}/{i}": v for i, v in enumerate(value)})
    return values


class Backend:
    """The interface: `start` opens (or continues) the tracker run, given what an earlier
    process kept (`kept`, {} the first time) and the run's settings; it returns what to keep
    (the run id). `log` sends one step's values, `finish` closes the run."""

    name = ""

    def start(self, home: Path, run_name: str, kept: dict[str, Any],
              config: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class TensorBoard(Backend):
    """Event files in HOME/tensorboard (one more file per process, as every writer does),
    through torch's SummaryWriter. Scalars are written as float64 tensors (TensorBoard's
    new-style scalars), so what is read back equals metrics.jsonl exactly."""

    name = "tensorboard"

    def start(self, home, run_name, kept, config):
        from torch.utils.tensorboard import SummaryWriter

        logdir = kept.get("logdir") or str(home / "tensorboard")
        self.writer = SummaryWriter(logdir)
        shown = dict(kept.get("config", {}))
        for section, settings in config.items():  # the settings as text, once per change
            digest = _digest(settings)
            if shown.get(section) != digest:
                text = json.dumps(settings, indent=2, sort_keys=True, default=str)
                self.writer.add_text(f"config/{section}", f"```\n{text}\n```", 0)
                shown[section] = digest
        return {"logdir": logdir, "config": shown}

    def log(self, values, step):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step, new_style=True, double_precision=True)
        self.writer.flush()

    def finish(self):
        self.writer.close()


class Wandb(Backend):
    """One W&B run continued by every process (`resume="allow"` with the kept id). The x
    axis is the `global_step` value logged with every row (wandb's define_metric), so an
    evaluation of an earlier checkpoint still lands at its step. Project and entity from
    WANDB_PROJECT (default "dcpo") and WANDB_ENTITY; WANDB_MODE=offline writes HOME/wandb
    for `wandb sync`. Without WANDB_INIT_TIMEOUT, a server that does not answer is given up
    after 30 s (wandb's own default is 90)."""

    name = "wandb"

    def start(self, home, run_name, kept, config):
        import wandb

        run_id = kept.get("run_id") or _new_id()
        home.mkdir(parents=True, exist_ok=True)
        settings = {"console": "off", "silent": True}
        if "WANDB_INIT_TIMEOUT" not in os.environ:
            settings["init_timeout"] = 30.0
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dcpo"), id=run_id,
                              name=run_name, resume="allow", config=config,
                              dir=None if os.environ.get("WANDB_DIR") else str(home),
                              settings=wandb.Settings(**settings))
        self.run.config.update(config, allow_val_change=True)
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")
        return {"run_id": run_id}

    def log(self, values, step):
        self.run.log({**values, "global_step": step})

    def finish(self):
        self.run.finish()


class Trackio(Backend):
    """A Trackio run (its wandb-like API), resumed by name; project from TRACKIO_PROJECT
    (default "dcpo"), its files where TRACKIO_DIR says. Its banners would go to dcpo's
    stdout (the tables): they are dropped."""

    name = "trackio"

    def start(self, home, run_name, kept, config):
        import trackio

        self.trackio = trackio
        name = kept.get("run_name") or run_name
        with _quiet_stdout():
            trackio.init(project=os.environ.get("TRACKIO_PROJECT", "dcpo"), name=name,
                         config=config, resume="allow")
        return {"run_name": name}

    def log(self, values, step):
        self.trackio.log(values, step=step)

    def finish(self):
        with _quiet_stdout():
            self.trackio.finish()


class Mlflow(Backend):
    """An MLflow run continued by its kept run id (MLFLOW_TRACKING_URI,
    MLFLOW_EXPERIMENT_NAME as MLflow reads them). MLflow refuses '@' in a metric name:
    `avg@8` is logged as `avg_at_8`. The settings are its params, `section.field`."""

    name = "mlflow"

    def start(self, home, run_name, kept, config):
        import mlflow

        self.mlflow = mlflow
        run = mlflow.start_run(run_id=kept.get("run_id"),
                               run_name=None if kept.get("run_id") else run_name)
        logged = dict(kept.get("config", {}))
        for section, settings in config.items():
            if section not in logged:  # MLflow params cannot change once logged
                mlflow.log_params({f"{section}.{k}": str(v)[:6000]
                                   for k, v in settings.items()})
                logged[section] = _digest(settings)
        return {"run_id": run.info.run_id, "config": logged}

    def log(self, values, step):
        self.mlflow.log_metrics({k.replace("@", "_at_"): float(v) for k, v in values.items()},
                                step=step)

    def finish(self):
        self.mlflow.end_run()


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (TensorBoard, Wandb, Trackio, Mlflow)}
assert set(BACKENDS) == set(TRACKERS) - {"none"}


class Trackers:
    """The backends `names` of one process, their kept state in HOME/trackers.json.

    `log` sends a stream's values at `step` to every backend that has not had that step of
    that stream yet; the train stream is monotone (a step at or below the last one logged is
    a resume), an eval stream remembers each step it logged. Nothing here raises."""

    def __init__(self, names: list[str] | tuple[str, ...], home: Path, run_name: str,
                 config: dict[str, Any]) -> None:
        self.names = [n for n in dict.fromkeys(names) if n != "none"]
        self.home, self.run_name, self.config = Path(home), run_name, config
        self.open: dict[str, Backend] = {}
        self.failed: set[str] = set()

    @property
    def path(self) -> Path:
        return self.home / TRACKERS_FILE

    def __bool__(self) -> bool:
        return bool(self.names)

    def log(self, stream: str, values: dict[str, float], step: int) -> None:
        if not self.names or not values:
            return
        kept = self._read()
        changed = False
        for name in self.names:
            entry = kept.setdefault(name, {})
            if name in self.failed or _already(entry.get("logged", {}), stream, step):
                continue
            backend = self._backend(name, entry)
            if backend is None:
                continue
            if self._call(name, backend.log, values, step):
                entry.setdefault("logged", {})
                entry["logged"][stream] = step if stream == TRAIN else sorted(
                    {*entry["logged"].get(stream, []), step})
                changed = True
        if changed:
            self._write(kept)

    def log_eval(self, summary: dict[str, dict[str, Any]], step: int) -> None:
        """An eval summary (benchmark -> metrics, and "average"), one stream per benchmark."""
        for benchmark, metrics in summary.items():
            if not benchmark.startswith("_"):
                self.log(f"eval/{benchmark}", tracker_values(f"eval/{benchmark}", metrics),
                         step)

    def close(self) -> None:
        for name, backend in list(self.open.items()):
            self._call(name, backend.finish)
        self.open.clear()

    def _backend(self, name: str, entry: dict[str, Any]) -> Backend | None:
        if name in self.open:
            return self.open[name]
        backend = BACKENDS[name]()
        try:
            kept = {k: v for k, v in entry.items() if k != "logged"}
            entry.update(backend.start(self.home, self.run_name, kept, self.config))
        except ImportError:
            # each backend is the extra of its name (pyproject.toml)
            self._warn(name, f"{name} is not installed (pip install 'dcpo-cli[{name}]')")
            return None
        except Exception as exc:  # noqa: BLE001  (a tracker never stops a step)
            self._warn(name, _describe(exc))
            return None
        self.open[name] = backend
        return backend

    def _call(self, name: str, method, *args) -> bool:
        try:
            method(*args)
            return True
        except Exception as exc:  # noqa: BLE001
            self._warn(name, _describe(exc))
            self.open.pop(name, None)
            return False

    def _warn(self, name: str, message: str) -> None:
        self.failed.add(name)
        print(f"warning: --report-to {name}: {message}; not logging to {name} (the files "
              "are the record)", file=sys.stderr, flush=True)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self, kept: dict[str, Any]) -> None:
        from dcpo_cli.files.contracts import atomic_path

        try:
            self.home.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n")
        except OSError as exc:
            print(f"warning: {self.path}: not written ({exc.strerror})", file=sys.stderr)


def tracker_home_for_eval(out: Path) -> Path:
    """Where `dcpo eval` keeps its tracker runs: the nearest folder at or above --out that
    holds a trackers.json (the run it belongs to), else --out itself."""
    out = Path(out).resolve()
    for folder in (out, *out.parents):
        if (folder / TRACKERS_FILE).is_file():
            return folder
    return out


def _already(logged: dict[str, Any], stream: str, step: int) -> bool:
    done = logged.get(stream)
    if done is None:
        return False
    return step <= done if stream == TRAIN else step in done


def _quiet_stdout():
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO())


def _new_id() -> str:
    """A W&B-style run id: 8 lowercase letters and digits."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _digest(settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}"
