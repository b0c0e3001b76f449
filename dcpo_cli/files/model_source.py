"""Where a model comes from: a local directory, or a Hugging Face Hub id with an optional
`@revision` (branch, tag or commit) resolved into the user's Hugging Face cache.

`resolve_model(spec)` is called once at each stage's entry (rollout, train-step --model, eval;
any later option naming a model reuses it). It returns a `ModelSource`: the local directory
the engines and `from_pretrained` load, and, for a Hub id, the id and the snapshot's commit
hash, which the stage records in its output's metadata.

`model_identity(source)` names the weights cheaply (no weight byte is read), for metadata and
for `dcpo eval`'s reuse of finished benchmarks:
- a Hub snapshot: its id and commit hash (a commit never changes);
- a dcpo checkpoint (has trainer_state.json): its small files, read whole (the trainer state
  holds the global step, the scored inputs' checksums and the SAS state checksum, so it is
  unique to the training history), plus the weight files' names and sizes. Checkpoints are
  written once, atomically, and never overwritten, so a copy keeps its identity;
- any other directory: small files (config, tokenizer, safetensors index) read whole, large
  ones (weights) by name, size and modification time. Every way of writing a weight file
  (save_pretrained, a download, cp) gives it a new mtime; equal size and mtime to the
  nanosecond with other bytes needs a deliberately forged timestamp. A copy without
  preserved times gets a new identity, which only costs a recomputation, never a wrong reuse.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dcpo_cli.errors import DcpoError
from dcpo_cli.files import weights_checksum

SMALL_FILE = 1 << 20  # files up to this size are identified by their bytes
TRAINER_STATE = "trainer_state.json"  # as checkpoint.TRAINER_STATE (kept torch-free here)
TRAINER_FORMAT = "dcpo-trainer-state"  # as checkpoint.TRAINER_FORMAT
# A Hub repo id: "name" or "org/name"; letters, digits, '-', '_', '.' (no '--' or '..').
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class ModelSource:
    spec: str                   # as the user wrote it
    path: Path                  # the local directory holding the model files
    repo_id: str | None = None  # Hub id, when resolved through the Hub cache
    revision: str | None = None  # the revision asked for (None: main)
    commit: str | None = None   # the snapshot's commit hash

    @property
    def name(self) -> str:
        """What a record calls the model: the Hub id, else the absolute directory."""
        return self.repo_id or str(self.path.resolve())

    def record(self) -> dict[str, str | None]:
        """Metadata fields: the model as given, its Hub id and commit (None when local)."""
        return {"model": self.spec, "model_id": self.repo_id, "model_commit": self.commit}


def parse_hub_spec(text: str) -> tuple[str, str | None] | None:
    """'org/name[@revision]' -> (id, revision); None when `text` cannot be a Hub id."""
    repo_id, sep, revision = text.partition("@")
    if sep and not revision:
        return None
    if text.startswith(("/", ".", "~")) or not HUB_ID.match(repo_id):
        return None
    if "--" in repo_id or ".." in repo_id or repo_id.endswith((".", "-")):
        return None
    return repo_id, revision or None


def resolve_model(spec: str | Path | ModelSource) -> ModelSource:
    """A local directory as is, else a Hub id through the Hugging Face cache (downloading
    what is missing unless offline). Raises DcpoError with one line saying what to do."""
    if isinstance(spec, ModelSource):
        return spec
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DcpoError(f"{text}: not a model directory")
        weights_checksum.verify(path)  # a checkpoint's weights as written (unless --no-verify)
        return ModelSource(text, path)
    parsed = parse_hub_spec(text)
    if parsed is None:
        raise DcpoError(f"{text}: no such model directory")
    repo_id, revision = parsed
    folder = _snapshot(text, repo_id, revision)
    # snapshot_download returns <cache>/models--org--name/snapshots/<commit>
    return ModelSource(text, Path(folder), repo_id, revision, Path(folder).name)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE), read now as well as at huggingface_hub's
    import, so a caller that sets it late is honoured too."""
    from huggingface_hub import constants

    values = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(
        (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"} for value in values)


def _snapshot(spec: str, repo_id: str, revision: str | None) -> str:
    from huggingface_hub import constants, errors, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # newer huggingface_hub releases tell an incomplete cached snapshot from a missing one
    incomplete = getattr(errors, "IncompleteSnapshotError", ())

    offline = hub_offline()
    cache = constants.HF_HUB_CACHE
    login = "log in with `hf auth login` or set HF_TOKEN"
    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=offline)
    except GatedRepoError:
        message = (f"gated on the Hugging Face Hub: accept its terms on its Hub page and "
                   f"{login}")
    except RepositoryNotFoundError:
        message = (f"no such model directory, nor a model on the Hugging Face Hub (if it is "
                   f"private, {login})")
    except RevisionNotFoundError:
        message = (f"the Hub repo {repo_id} has no revision {revision!r}; name a branch, tag "
                   "or commit it has")
    except incomplete:
        message = (f"the cached copy in {cache} is incomplete and the Hub cannot be reached; "
                   "run once online to complete it")
    except LocalEntryNotFoundError:
        if offline:
            message = (f"not in the Hugging Face cache ({cache}) and offline mode is on "
                       f"(HF_HUB_OFFLINE); download it first (`hf download {repo_id}`), unset "
                       "HF_HUB_OFFLINE, or pass a local model directory")
        else:
            message = (f"the Hugging Face Hub cannot be reached and it is not in the cache "
                       f"({cache}); check the connection or pass a local model directory")
    except (HfHubHTTPError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        message = f"cannot fetch it from the Hugging Face Hub ({reason})"
    raise DcpoError(f"{spec}: {message}")


def is_weight_file(path: Path) -> bool:
    return path.suffix in (".safetensors", ".bin", ".pt", ".pth")


def policy_step(path: str | Path) -> int:
    """The train step a model's weights come from: a dcpo checkpoint's `global_step` (its
    trainer state), 0 for any other model (a base model, a Hub snapshot, another trainer's
    checkpoint). Rollouts record it as their sampling policy's step; train-step subtracts it
    from --model's: the step's staleness."""
    import json

    state = Path(path) / TRAINER_STATE
    try:
        record = json.loads(state.read_text()) if state.is_file() else {}
    except (OSError, ValueError):
        raise DcpoError(f"{state}: not a readable trainer state") from None
    if not isinstance(record, dict) or record.get("format") != TRAINER_FORMAT:
        return 0
    step = record.get("global_step")
    if not isinstance(step, int) or step < 0:
        raise DcpoError(f"{state}: global_step {step!r} is not a step number")
    return step


def model_identity(source: ModelSource | str | Path) -> str:
    """sha256 naming the model's weights without reading them (see the module docstring)."""
    if not isinstance(source, ModelSource):
        source = ModelSource(str(source), Path(source))
    digest = hashlib.sha256()
    if source.commit:
        digest.update(f"hub:{source.repo_id}@{source.commit}".encode())
        return digest.hexdigest()
    path = source.path
    items = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    checkpoint = (path / TRAINER_STATE).is_file()
    for item in items:
        stat = item.stat()
        digest.update(f"\0{item.name}\0{stat.st_size}\0".encode())
        if stat.st_size <= SMALL_FILE and not is_weight_file(item):
            digest.update(item.read_bytes())
        elif not checkpoint:
            digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()
