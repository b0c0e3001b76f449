"""How to start a generation engine (`--tensor-parallel-size`, `--dtype`, `--engine-arg`, ...),
shared by `dcpo rollout` and `dcpo eval`. Torch-free, so the CLI can build and check it
before anything heavy is imported.

The dedicated flags are the settings every vLLM user meets (TRL's `vllm_tensor_parallel_size`,
verl's `rollout.tensor_model_parallel_size`); `--engine-arg KEY=VALUE` passes any other
`vllm.LLM` / `EngineArgs` field through, its value read as JSON where it parses
(`8`, `0.5`, `true`, `{"mode": 0}`) and as a string otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError
from dcpo_cli.fields import Spec, check_fields, option

DTYPES = ("auto", "bfloat16", "float16", "float32")
# Engine arguments dcpo sets itself or that have their own flag.
OWN_FLAGS = {
    "tensor_parallel_size": "--tensor-parallel-size",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "max_model_len": "--max-model-len",
    "dtype": "--dtype",
    "enforce_eager": "--enforce-eager",
}
RESERVED = {
    "model": "--model",
    "tokenizer": "--model (the tokenizer is the model's own)",
    "logprobs_mode": "nothing: dcpo needs the sampled distribution's log-probs",
    "worker_extension_cls": "nothing: dcpo run's weight updates need dcpo's own",
}


ENGINE = "Engine"


def _parse_engine_args(items: list[str]) -> tuple[tuple[str, Any], ...]:
    return parse_engine_args(items)


@dataclass(frozen=True)
class EngineSettings:
    tensor_parallel_size: int = option(
        1, "vLLM: GPUs one engine spans (tensor parallel). For data-parallel rollouts run one "
        "process per GPU group with --shard i/n.", panel=ENGINE, at_least=1)
    gpu_memory_utilization: float | None = option(
        None, "vLLM: share of each GPU's memory the engine may take (default: vLLM's own); on "
        "vLLM's CPU build, the share of CPU memory.", panel=ENGINE, above=0, at_most=1)
    max_model_len: int | None = option(
        None, "vLLM: longest prompt + response it reserves room for (default: the model's "
        "context length).", panel=ENGINE, at_least=1)
    dtype: str = option("auto", "Weights' dtype: auto, bfloat16, float16 or float32 (auto: "
                        "bfloat16 on GPU, float32 on CPU for hf; the model's own for vLLM).",
                        panel=ENGINE, choices=DTYPES)
    enforce_eager: bool = option(False, "vLLM: no CUDA graphs or torch.compile (starts "
                                 "faster, generates slower).", panel=ENGINE,
                                 flags=("--enforce-eager",))
    # (key, value) pairs, in the order given
    engine_args: tuple[tuple[str, Any], ...] = option(
        (), "vLLM: any other engine argument, e.g. max_num_seqs=256 or "
        "enable_prefix_caching=false (VALUE read as JSON where it parses). Repeatable.",
        panel=ENGINE, flags=("--engine-arg",), metavar="KEY=VALUE", cli_type=list[str],
        cli_default=[], parse=_parse_engine_args)
    verbose: bool = option(False, "Show the engine's own INFO logs and load progress bars (by "
                           "default only its warnings and errors).", panel=ENGINE,
                           flags=("--verbose",))

    def check(self) -> None:
        check_fields(self)

    def record(self) -> dict[str, Any]:
        """What the metadata keeps (JSON-ready)."""
        return {"tensor_parallel_size": self.tensor_parallel_size,
                "gpu_memory_utilization": self.gpu_memory_utilization,
                "max_model_len": self.max_model_len, "dtype": self.dtype,
                "enforce_eager": self.enforce_eager, "engine_args": dict(self.engine_args)}

    def options_for(self, engine: str) -> dict[str, Any]:
        """Keyword arguments for the engine class `engine` ("hf", "vllm" or "server"). The hf
        engine takes only --dtype; a vLLM setting given to it is an error, not silently
        dropped; the server engine takes none (its server's engine has them)."""
        self.check()
        if engine == "server":
            given = [flag for flag, value in (
                ("--tensor-parallel-size", self.tensor_parallel_size != 1),
                ("--gpu-memory-utilization", self.gpu_memory_utilization is not None),
                ("--max-model-len", self.max_model_len is not None),
                ("--dtype", self.dtype != "auto"), ("--enforce-eager", self.enforce_eager),
                ("--engine-arg", bool(self.engine_args)),
            ) if value]
            if given:
                raise DcpoError(f"{given[0]} is a setting of the server's engine: pass it to "
                                "`dcpo serve`, not to a command with --engine server")
            return {}
        if engine == "vllm":
            return {"tensor_parallel_size": self.tensor_parallel_size,
                    "gpu_memory_utilization": self.gpu_memory_utilization,
                    "max_model_len": self.max_model_len, "dtype": self.dtype,
                    "enforce_eager": self.enforce_eager, "engine_args": dict(self.engine_args),
                    "verbose": self.verbose}
        vllm_only = [flag for flag, value in (
            ("--tensor-parallel-size", self.tensor_parallel_size != 1),
            ("--gpu-memory-utilization", self.gpu_memory_utilization is not None),
            ("--max-model-len", self.max_model_len is not None),
            ("--enforce-eager", self.enforce_eager),
            ("--engine-arg", bool(self.engine_args)),
        ) if value]
        if vllm_only:
            raise DcpoError(f"{vllm_only[0]} is a vLLM setting, but the {engine} engine was "
                            "chosen (pass --engine vllm)")
        return {"dtype": None if self.dtype == "auto" else self.dtype}


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_engine_args(items: list[str]) -> tuple[tuple[str, Any], ...]:
    """['max_num_seqs=64', 'enable-prefix-caching=false'] -> (('max_num_seqs', 64),
    ('enable_prefix_caching', False)); dashes in keys become underscores, as in vLLM's CLI."""
    pairs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise DcpoError(f"--engine-arg {item!r}: expected KEY=VALUE, e.g. max_num_seqs=64")
        if key in OWN_FLAGS:
            raise DcpoError(f"--engine-arg {key}: use {OWN_FLAGS[key]} instead")
        if key in RESERVED:
            raise DcpoError(f"--engine-arg {key}: set by dcpo itself (use {RESERVED[key]})")
        pairs[key] = parse_value(value)
    return tuple(pairs.items())


def visible_devices() -> tuple[int, str]:
    """How many devices a tensor-parallel group can span here: the GPUs torch sees, else the
    CPU's NUMA nodes (vLLM's CPU backend places one rank per node)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPU"
    nodes = [p for p in Path("/sys/devices/system/node").glob("node[0-9]*") if p.is_dir()]
    return max(len(nodes), 1), "CPU NUMA node"


def check_tensor_parallel(size: int) -> None:
    count, kind = visible_devices()
    if size > count:
        plural = "s" if count != 1 else ""
        raise DcpoError(f"--tensor-parallel-size {size}: only {count} {kind}{plural} visible "
                        "here (one rank per device; use --shard i/n for data-parallel "
                        "rollouts)")


@dataclass(frozen=True)
class ServerAddress:
    """Where a `dcpo serve` listens (`--server-url`) and its token (`--server-token`), for
    `--engine server`. The token is never recorded or shown."""

    url: str | None = option(None, "With --engine server: the address of a running `dcpo "
                             "serve` (e.g. http://127.0.0.1:8765).", panel=ENGINE,
                             flags=("--server-url",))
    token: str | None = field(default=None, repr=False, metadata={"option": Spec(
        "With --engine server: the token the server was started with (--token).",
        panel=ENGINE, flags=("--server-token",), envvar="DCPO_SERVER_TOKEN")})

    def check(self) -> None:
        from urllib.parse import urlsplit

        if self.token:  # (empty: no token, as when DCPO_SERVER_TOKEN is set but empty)
            check_token(self.token, "--server-token")
        if self.url is None:  # no server
            return
        parts = urlsplit(self.url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "http" or not parts.hostname or port is None \
                or parts.path not in ("", "/") or parts.query:
            raise DcpoError(f"--server-url {self.url!r}: expected http://HOST:PORT, e.g. "
                            "http://127.0.0.1:8765 (as `dcpo serve` prints it)")

    @property
    def base(self) -> str:
        return self.url.rstrip("/")


def check_token(token: str, flag: str) -> None:
    """A token travels in an HTTP header: printable ASCII, no spaces (it is never shown)."""
    if not token:
        raise DcpoError(f"{flag} is empty")
    bad = next((c for c in token if not "!" <= c <= "~"), None)
    if bad is not None:
        what = "a non-ASCII character" if not bad.isascii() else "a space or control " \
            "character"
        raise DcpoError(f"{flag} (or DCPO_SERVER_TOKEN): a token must be printable ASCII "
                        f"without spaces; it holds {what} at position {token.index(bad) + 1}")
