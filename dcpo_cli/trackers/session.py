"""The trackers of one process (`Trackers`): which steps each backend has had, kept in
`HOME/trackers.json` so a resumed or re-run step is never logged twice, and a backend that
fails is warned about once and left alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from dcpo_cli.options import TRACKERS
from dcpo_cli.trackers.base import TRAIN, Backend, tracker_values
from dcpo_cli.trackers.mlflow import Mlflow
from dcpo_cli.trackers.tensorboard import TensorBoard
from dcpo_cli.trackers.trackio import Trackio
from dcpo_cli.trackers.wandb import Wandb

TRACKERS_FILE = "trackers.json"
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


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}"
