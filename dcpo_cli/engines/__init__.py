"""Generation back ends behind one interface: `load_engine("hf" | "vllm" | "auto", model)`."""

from __future__ import annotations

from pathlib import Path

from dcpo_cli.engines.base import Completion, Engine, SamplingSettings
from dcpo_cli.errors import DcpoError
from dcpo_cli.extras import installed, require
from dcpo_cli.options import ENGINES, SERVABLE

# The engine registry: name -> "module:class", imported only when chosen. A new back end is
# one module implementing `Engine` (see base.py), one entry here and its name in
# options.ENGINES (the command line's list).
REGISTRY = {
    "hf": "dcpo_cli.engines.hf:HFEngine",
    "vllm": "dcpo_cli.engines.vllm:VllmEngine",
    "server": "dcpo_cli.engines.serve_client:ServerEngine",  # a running `dcpo serve`, over HTTP
}
# the command line's names (options.py) are these
assert ("auto", *REGISTRY) == ENGINES and tuple(e for e in ENGINES if e != "server") == SERVABLE

__all__ = ["ENGINES", "REGISTRY", "SERVABLE", "Completion", "Engine", "SamplingSettings",
           "engine_options", "load_engine", "pick_engine"]


def pick_engine(kind: str) -> str:
    """`auto` means vllm when it is importable and a GPU is present, else hf."""
    if kind not in ENGINES:
        raise DcpoError(f"--engine {kind!r}: expected one of {', '.join(ENGINES)}")
    if kind == "vllm":
        require("vllm", "--engine vllm")
    if kind != "auto":
        return kind
    if not installed("vllm"):
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


def engine_options(kind: str, settings, server=None, source=None) -> dict:
    """`load_engine`'s keyword arguments for engine `kind` (already picked): the engine
    settings it takes (`EngineSettings.options_for`), and for the server engine its address
    (`ServerAddress`) and the model it is asked to serve (`ModelSource`)."""
    if kind == "server":
        if server is None:
            raise DcpoError("--engine server needs --server-url URL (the address `dcpo serve` "
                            "prints)")
        settings.options_for(kind)  # engine flags belong to the server
        return {"address": server, "source": source}
    if server is not None:
        raise DcpoError(f"--server-url is for --engine server, not --engine {kind}")
    return settings.options_for(kind)


def load_engine(kind: str, model_path: str | Path, **options) -> Engine:
    kind = pick_engine(kind)
    model_path = Path(model_path)
    from dcpo_cli.files.lora_adapter import is_adapter

    if not model_path.is_dir() or not ((model_path / "config.json").is_file()
                                       or is_adapter(model_path)):
        raise DcpoError(f"{model_path}: not a model directory (no config.json)")
    import importlib

    module, name = REGISTRY[kind].split(":")
    return getattr(importlib.import_module(module), name)(model_path, **options)
