"""A LoRA checkpoint's adapter directory: what it holds, which base it names, writing it.

A LoRA checkpoint is a train-step checkpoint whose model directory is a peft adapter
(`adapter_config.json`, `adapter_model.safetensors`: `PeftModel.from_pretrained(base, CKPT)`
loads it) instead of full weights. `adapter_config.json` names the base model
(`base_model_name_or_path`: a Hub id or an absolute directory) and its revision (the Hub
commit, or none for a directory), so every stage finds the base without being told.
Wrapping a policy with peft and loading an adapter into one is `dcpo_cli.policy.lora`.

Everything but `save_adapter` imports nothing heavy (the engines and `dcpo serve` ask
`is_adapter` and `base_source` without torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # the PeftModel's names of the injected model's weights
# The attribute of a LoRA policy that holds its PeftModel (policy/lora.py attaches it)
PEFT_ATTRIBUTE = "dcpo_peft"


def is_adapter(directory: str | Path) -> bool:
    """A peft adapter directory (a LoRA checkpoint) rather than a full model directory."""
    directory = Path(directory)
    return (directory / ADAPTER_CONFIG).is_file() and not (directory / "config.json").is_file()


def adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DcpoError(f"{path}: unreadable adapter config ({exc})") from None
    if config.get("peft_type") != "LORA" or not config.get("base_model_name_or_path"):
        raise DcpoError(f"{path}: not a LoRA adapter that names its base model")
    return config


def base_spec(directory: str | Path) -> str:
    """The base model of a LoRA checkpoint, as `--model` takes it: `id@commit` or a path."""
    config = adapter_config(directory)
    name, revision = config["base_model_name_or_path"], config.get("revision")
    return f"{name}@{revision}" if revision else name


def base_source(directory: str | Path):
    """The base model's `ModelSource` (a Hub id is found in the cache, as --model is)."""
    from dcpo_cli.files.model_source import resolve_model

    spec = base_spec(directory)
    try:
        return resolve_model(spec)
    except DcpoError as exc:
        raise DcpoError(f"{directory}: its base model {spec} cannot be loaded ({exc})") \
            from None


def checkpoint_settings(directory: Path) -> dict[str, Any]:
    """The same four settings as a LoRA checkpoint's adapter_config.json records them."""
    config = adapter_config(directory)
    targets = config.get("target_modules")
    return {"lora_rank": int(config["r"]), "lora_alpha": float(config["lora_alpha"]),
            "lora_dropout": float(config.get("lora_dropout") or 0.0),
            "lora_target_modules": targets if isinstance(targets, str)
            else ",".join(sorted(targets or []))}


def peft_of(model):
    """The `PeftModel` of a LoRA policy, None for a full fine-tuning one."""
    return getattr(model, "__dict__", {}).get(PEFT_ATTRIBUTE)


def save_adapter(directory: Path, model, trainable_full: dict[str, Any]) -> None:
    """Write the adapter in peft's layout (adapter_config.json naming the base and its
    revision, adapter_model.safetensors in fp32: the adapter is small, and the rollouts then
    sample from exactly the trained values). `trainable_full`: the full (gathered) state
    dict of the trainable parameters under the injected model's names."""
    import torch

    peft_model = peft_of(model)
    state = {PEFT_PREFIX + k: v.detach().to(torch.float32).contiguous()
             for k, v in trainable_full.items()}
    peft_model.save_pretrained(str(directory), state_dict=state, safe_serialization=True,
                               save_embedding_layers=False)
