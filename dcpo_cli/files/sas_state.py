"""The SAS state file: per-prompt cumulative reward statistics carried between train steps.

A small JSON document, human-readable and shown by `dcpo inspect`:

    {"format": "dcpo-sas-state", "version": 1, "last_step": 3,
     "prompts": {"<prompt_id>": {"times": 2, "mean": 0.5, "std": 0.51}, ...},
     "checksum": "sha256:..."}

`checksum` is the sha256 of the rest of the document in canonical JSON (sorted keys, no
spaces): a state changed after it was written (a flipped byte, an edit) is refused on load,
as are a truncated one (not JSON) and a document that breaks the format. A state without a
checksum (written by an older dcpo, or by hand) is loaded as before.

A state is immutable once loaded: `absorb` returns the next state, and refuses a step it
(or a later one) has already absorbed, so no rollout step is ever counted twice.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcpo_cli.core.algorithms import PromptStats
from dcpo_cli.errors import DcpoError, first_line
from dcpo_cli.files import contracts

FORMAT = "dcpo-sas-state"
VERSION = 1
FIELDS = {"format", "version", "last_step", "prompts", "checksum"}


@dataclass(frozen=True)
class SasState:
    prompts: dict[str, PromptStats] = field(default_factory=dict)
    last_step: int | None = None  # the last rollout step absorbed; None when new

    def get(self, prompt_id: str) -> PromptStats | None:
        """The prompt's statistics, or None for a prompt never trained on (a new prompt set
        simply starts empty)."""
        return self.prompts.get(prompt_id)

    def absorb(self, step: int, updates: dict[str, PromptStats],
               path: str | Path = "SAS state") -> SasState:
        """The state after training on rollout `step`, whose groups produced `updates`."""
        if self.last_step is not None and step <= self.last_step:
            raise DcpoError(f"{path}: already absorbed step {self.last_step}; refusing to "
                            f"absorb step {step}")
        return SasState({**self.prompts, **updates}, step)

    def to_json(self) -> dict[str, Any]:
        data = {
            "format": FORMAT,
            "version": VERSION,
            "last_step": self.last_step,
            "prompts": {pid: {"times": s.times, "mean": s.mean, "std": s.std}
                        for pid, s in self.prompts.items()},
        }
        return {**data, "checksum": checksum(data)}

    def save(self, path: str | Path) -> None:
        """Atomic write; keys sorted so equal states are equal bytes."""
        contracts.write_json(self.to_json(), path)

    @classmethod
    def load(cls, path: str | Path) -> SasState:
        """The state in `path`; an absent file is the empty state (the first step)."""
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DcpoError(f"{path}: not a readable SAS state file ({first_line(exc)})") from None
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data: Any, path: str | Path) -> SasState:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DcpoError(f"{path}: not a SAS state file (expected \"format\": \"{FORMAT}\")")
        unknown = sorted(set(data) - FIELDS)
        if unknown:  # also a damaged "checksum" key, which would otherwise go unchecked
            raise DcpoError(f"{path}: unknown field {unknown[0]!r} in the SAS state")
        if "checksum" in data:
            data = dict(data)
            if data.pop("checksum") != checksum(data):
                raise DcpoError(f"{path}: checksum mismatch: the SAS state changed after it "
                                "was written")
        if data.get("version") != VERSION:
            raise DcpoError(f"{path}: SAS state version {data.get('version')!r} is not "
                            f"supported (expected {VERSION})")
        last_step = data.get("last_step")
        if last_step is not None and (not isinstance(last_step, int) or last_step < 0):
            raise DcpoError(f"{path}: last_step must be a non-negative integer or null")
        prompts = data.get("prompts")
        if not isinstance(prompts, dict):
            raise DcpoError(f"{path}: 'prompts' must be an object keyed by prompt_id")
        parsed = {}
        for prompt_id, entry in prompts.items():
            parsed[prompt_id] = _parse_entry(entry, prompt_id, path)
        return cls(parsed, last_step)


def _parse_entry(entry: Any, prompt_id: str, path: str | Path) -> PromptStats:
    where = f"{path}: prompt {prompt_id!r}"
    if not isinstance(entry, dict) or set(entry) != {"times", "mean", "std"}:
        raise DcpoError(f"{where} must have exactly the fields times, mean, std")
    times, mean, std = entry["times"], entry["mean"], entry["std"]
    if not isinstance(times, int) or isinstance(times, bool) or times < 1:
        raise DcpoError(f"{where}: times must be a positive integer")
    for name, value in (("mean", mean), ("std", std)):
        if not isinstance(value, int | float) or isinstance(value, bool) \
                or not math.isfinite(value):
            raise DcpoError(f"{where}: {name} must be a finite number")
    if std < 0:
        raise DcpoError(f"{where}: std must be >= 0")
    return PromptStats(times=times, mean=float(mean), std=float(std))



def checksum(data: dict[str, Any]) -> str:
    """sha256 of the document in canonical JSON: independent of indentation and key order."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
