"""Generation back ends behind one interface: `load_engine("hf" | "vllm" | "auto", model)`."""

from __future__ import annotations

from pathlib import Path

from dcpo_cli.engines.base import Completion, Engine, SamplingSettings
from dcpo_cli.errors import DcpoError

# The engine registry: name -> "module:class", imported only when chosen. A new back end is
# one module implementing `Engine` (see base.py) and one entry here; `--engine` lists it.
REGISTRY = {
    "hf": "dcpo_cli.engines.hf:HFEngine",
    "vllm": "dcpo_cli.engines.vllm:VllmEngine",
}
ENGINES = ("auto", *REGISTRY)

__all__ = ["ENGINES", "REGISTRY", "Completion", "Engine", "SamplingSettings", "load_engine",
           "pick_engine"]


def pick_engine(kind: str) -> str:
    """`auto` means vllm when it is importable and a GPU is present, else hf."""
    if kind not in ENGINES:
        raise DcpoError(f"--engine {kind!r}: expected one of {', '.join(ENGINES)}")
    if kind != "auto":
        return kind
    import importlib.util  # here, not at the top: `dcpo --help` imports this package

    if importlib.util.find_spec("vllm") is None:
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


def load_engine(kind: str, model_path: str | Path, **options) -> Engine:
    kind = pick_engine(kind)
    model_path = Path(model_path)
    from dcpo_cli.files.lora import is_adapter

    if not model_path.is_dir() or not ((model_path / "config.json").is_file()
                                       or is_adapter(model_path)):
        raise DcpoError(f"{model_path}: not a model directory (no config.json)")
    import importlib

    module, name = REGISTRY[kind].split(":")
    return getattr(importlib.import_module(module), name)(model_path, **options)
