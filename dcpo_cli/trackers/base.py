"""What every tracker backend is (`Backend`), and the values they are given: the numbers of
a metrics record or an eval summary, named `prefix/key` (`tracker_values`)."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

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


class Backend(ABC):
    """The interface: `start` opens (or continues) the tracker run, given what an earlier
    process kept (`kept`, {} the first time) and the run's settings; it returns what to keep
    (the run id). `log` sends one step's values, `finish` closes the run. A backend missing
    one of them cannot be created."""

    name = ""

    @abstractmethod
    def start(self, home: Path, run_name: str, kept: dict[str, Any],
              config: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def log(self, values: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def finish(self) -> None: ...


def quiet_stdout():
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO())


def new_id() -> str:
    """A W&B-style run id: 8 lowercase letters and digits."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def digest(settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]
