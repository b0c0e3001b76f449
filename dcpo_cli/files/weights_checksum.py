"""Checksums of a checkpoint's weight files: recorded when train-step writes the checkpoint,
verified whenever a stage loads it (rollout, eval, train-step, its KL reference, dcpo run).

A weights file changed on disk after it was written (a flipped byte, a truncated or swapped
`*.safetensors`) would otherwise load silently. The record lives in the checkpoint's
`trainer_state.json` (`weights_checksums`: the hash's name and, per file, its size and
digest). A directory without that record (a Hub snapshot, the tiny model, a checkpoint of an
older dcpo) loads as before. The hash is xxhash's xxh3_128: not cryptographic (this guards
against accidents, not against an attacker, who could rewrite the record too), and 4-7x
faster than sha256 or blake2b (`benchmarks/bench_checksum.py`: 4.2 GB/s on 1 GB).
`--no-verify` on the loading commands skips the check (`set_verify(False)`, once per
process). A directory verified once is not hashed again in the same process while its files
keep their sizes and modification times (`dcpo run` names each checkpoint to several
stages).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError

ALGORITHM = "xxh3_128"
RECORD_KEY = "weights_checksums"  # in trainer_state.json
TRAINER_STATE = "trainer_state.json"
BLOCK = 8 << 20
_verify = True
_verified: set[tuple] = set()  # (directory, (name, size, mtime_ns) of each file) checked


def set_verify(verify: bool) -> None:
    """`--no-verify`: this process loads checkpoints without checking their weights."""
    global _verify
    _verify = verify


def weight_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("*.safetensors"))


def digest(path: Path) -> str:
    import xxhash

    value = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            value.update(block)
    return value.hexdigest()


def record(directory: Path) -> dict[str, Any]:
    """The record of every weights file in `directory`, for its trainer_state.json."""
    return {"algorithm": ALGORITHM,
            "files": {p.name: {"size": p.stat().st_size, "digest": digest(p)}
                      for p in weight_files(directory)}}


def verify(directory: Path) -> None:
    """Check `directory`'s weights against its record, if it has one; a mismatch is a
    DcpoError naming the file. Nothing to check (no record, or --no-verify): returns."""
    if not _verify:
        return
    directory = Path(directory)
    state_path = directory / TRAINER_STATE
    if not state_path.is_file():
        return
    try:
        recorded = json.loads(state_path.read_text()).get(RECORD_KEY)
    except (OSError, json.JSONDecodeError, AttributeError):
        return  # reading the trainer state reports its own problems
    if not isinstance(recorded, dict) or not isinstance(recorded.get("files"), dict):
        return
    if recorded.get("algorithm") != ALGORITHM:
        raise DcpoError(f"{state_path}: weights checksums of an unknown kind "
                        f"{recorded.get('algorithm')!r} (--no-verify loads it unchecked)")
    files = recorded["files"]
    stamp = (str(directory.resolve()), tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weight_files(directory)))
    if stamp in _verified:
        return
    hint = "changed after the checkpoint was written (--no-verify loads it anyway)"
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise DcpoError(f"{path}: weights file missing from the checkpoint ({hint})")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise DcpoError(f"{path}: {size} bytes, {entry.get('size')} when written: "
                            f"truncated or replaced; {hint}")
        if digest(path) != entry.get("digest"):
            raise DcpoError(f"{path}: checksum mismatch: the weights {hint}")
    extra = [p.name for p in weight_files(directory) if p.name not in files]
    if extra:
        raise DcpoError(f"{directory / extra[0]}: a weights file the checkpoint did not "
                        f"write ({hint})")
    _verified.add(stamp)
