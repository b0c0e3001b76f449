"""The prebuilt tiny model: `init_tiny(seed=0, size="default")`'s output, shipped in the
package (dcpo_cli/data/tiny, with BUILD.json naming the torch / transformers / CPU it was
built with), so `dcpo tiny init` copies it in a second instead of training it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREBUILT_DIR = ("data", "tiny")
PREBUILT_OPTIONS = {"seed": 0, "size": "default"}
PREBUILT_FILES = ("model", "train.parquet", "test.parquet", "summary.json")


@dataclass
class TinyResult:
    """What `init_tiny` returns, whether it copied these files or trained the model."""
    directory: Path
    summary: dict[str, Any]
    seconds: float
    prebuilt: bool = False  # copied from the package rather than trained here


def prebuilt_source():
    """The packaged prebuilt directory (a Traversable; a real folder in any normal install)."""
    from importlib import resources

    return resources.files("dcpo_cli").joinpath(*PREBUILT_DIR)


def copy_prebuilt(directory: Path):
    """Copy the shipped seed-0 model and task into `directory`, atomically."""
    import json
    from importlib import resources

    from dcpo_cli.errors import DcpoError
    from dcpo_cli.files import contracts

    started = time.perf_counter()
    with resources.as_file(prebuilt_source()) as source:
        missing = [name for name in PREBUILT_FILES if not (source / name).exists()]
        if missing:  # only a broken install gets here
            raise DcpoError(f"{source}: the prebuilt tiny model lacks {', '.join(missing)}; "
                            "reinstall dcpo-cli or pass --rebuild")
        with contracts.atomic_path(directory) as tmp:
            for name in PREBUILT_FILES:
                for path in [source / name, *sorted((source / name).rglob("*"))]:
                    if path.is_file():  # plain copies: writable even if the package is not
                        target = tmp / path.relative_to(source)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(path.read_bytes())
        summary = json.loads((source / "summary.json").read_text())
    return TinyResult(directory, summary, time.perf_counter() - started, prebuilt=True)


def build_environment() -> dict[str, Any]:
    """What decides whether a rebuild is bit-identical: the libraries, the CPU's vector
    instructions used by torch's kernels, and the thread count (summation order)."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def refresh_prebuilt(built: Path, target: Path) -> None:
    """Maintainers: replace the shipped files with `built` (the output of
    `dcpo tiny init --rebuild built`, in this process's environment) and record that
    environment in BUILD.json. From the repository root:
    python -c "from pathlib import Path; from dcpo_cli.tiny import prebuilt as t;
               t.refresh_prebuilt(Path('built'), Path('dcpo_cli/data/tiny'))"
    """
    import shutil

    from dcpo_cli.files import contracts

    for name in PREBUILT_FILES:
        old = target / name
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
        (shutil.copytree if (built / name).is_dir() else shutil.copyfile)(built / name, old)
    contracts.write_json(build_environment(), target / "BUILD.json")
