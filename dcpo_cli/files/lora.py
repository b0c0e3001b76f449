"""LoRA adapters through Hugging Face peft: wrapping a policy, loading and saving an adapter.

A LoRA checkpoint is a train-step checkpoint whose model directory is a peft adapter
(`adapter_config.json`, `adapter_model.safetensors`: `PeftModel.from_pretrained(base, CKPT)`
loads it) instead of full weights. `adapter_config.json` names the base model
(`base_model_name_or_path`: a Hub id or an absolute directory) and its revision (the Hub
commit, or none for a directory), so every stage finds the base without being told.

In train-step the policy is the transformers model with peft's LoRA layers injected in place
(`peft_model.get_base_model()`): the chunked log-prob code, FSDP2's per-layer sharding and the
DCP training state see the usual module tree, with only the adapter's parameters trainable.
The `PeftModel` that wraps it rides along as `model.dcpo_peft` (an attribute outside the
module tree) for what needs peft: saving the adapter, and `disable_adapter()`, which gives
the base model's log-probs for the KL reference without a second copy of the weights.

The light helpers (`is_adapter`, `adapter_config`, `base_spec`) import nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output head
PEFT_PREFIX = "base_model.model."  # the PeftModel's names of the injected model's weights


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


def target_list(targets: str) -> str | list[str]:
    """`--lora-target-modules` (comma-separated names, or all-linear) as peft takes it."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    return ALL_LINEAR if names == [ALL_LINEAR] else names


def linear_module_names(model) -> list[str]:
    import torch

    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)]


def check_targets(model, targets: str, where: str) -> None:
    """Every named target module must be a linear layer of `model` (peft's matching: the
    module's name, or its last dotted components); one line naming the first missing one."""
    wanted = target_list(targets)
    if wanted == ALL_LINEAR:
        return
    if not wanted:
        raise DcpoError("--lora-target-modules: name at least one module (or all-linear)")
    linear = linear_module_names(model)
    for target in wanted:
        if not any(name == target or name.endswith(f".{target}") for name in linear):
            kinds = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise DcpoError(f"--lora-target-modules {target}: {where} has no linear module of "
                            f"that name (it has {', '.join(kinds)})")


def wrap(model, rank: int, alpha: float, dropout: float, targets: str, *, base_name: str,
         base_revision: str | None):
    """Inject a fresh LoRA adapter (B = 0, so the model computes exactly what it did) and
    freeze everything else; returns the injected model, its `PeftModel` attached."""
    from peft import LoraConfig, get_peft_model

    check_targets(model, targets, base_name)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=target_list(targets), bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    # peft names the base by the path it was loaded from (maybe relative): ours is the
    # resolved one (a Hub id and commit, or an absolute directory)
    _name_base(peft_model, base_name, base_revision)
    return _attached(peft_model)


def _name_base(peft_model, name: str, revision: str | None) -> None:
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path, config.revision = name, revision


def load(model, directory: Path, trainable: bool):
    """The adapter of LoRA checkpoint `directory` injected into the base `model`."""
    from dcpo_cli.extras import require

    require("lora", f"{directory}: a LoRA checkpoint")
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(directory), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise DcpoError(f"{directory}: cannot load the LoRA adapter ({reason})") from None
    recorded = adapter_config(directory)
    _name_base(peft_model, recorded["base_model_name_or_path"], recorded.get("revision"))
    return _attached(peft_model)


def _attached(peft_model):
    model = peft_model.get_base_model()
    # object.__setattr__: not a submodule (the PeftModel contains `model`; a cycle would
    # break state_dict and FSDP2's module walk)
    object.__setattr__(model, "dcpo_peft", peft_model)
    return model


def peft_of(model):
    """The `PeftModel` of a LoRA policy, None for a full fine-tuning one."""
    return getattr(model, "__dict__", {}).get("dcpo_peft")


def settings_of(model) -> dict[str, Any] | None:
    """rank, alpha, dropout and target modules of a LoRA policy (None without LoRA)."""
    peft_model = peft_of(model)
    if peft_model is None:
        return None
    config = peft_model.peft_config["default"]
    targets = config.target_modules
    return {"lora_rank": config.r, "lora_alpha": float(config.lora_alpha),
            "lora_dropout": float(config.lora_dropout),
            "lora_target_modules": targets if isinstance(targets, str)
            else ",".join(sorted(targets))}


def checkpoint_settings(directory: Path) -> dict[str, Any]:
    """The same four settings as a LoRA checkpoint's adapter_config.json records them."""
    config = adapter_config(directory)
    targets = config.get("target_modules")
    return {"lora_rank": int(config["r"]), "lora_alpha": float(config["lora_alpha"]),
            "lora_dropout": float(config.get("lora_dropout") or 0.0),
            "lora_target_modules": targets if isinstance(targets, str)
            else ",".join(sorted(targets or []))}


def same_targets(given: str, recorded: str) -> bool:
    """--lora-target-modules against a checkpoint's record (peft expands all-linear into
    the names it found, so all-linear matches any record)."""
    wanted = target_list(given)
    return wanted == ALL_LINEAR or sorted(wanted) == sorted(recorded.split(","))


def dropout_modules(model) -> list:
    import torch

    return [m for name, m in model.named_modules()
            if ".lora_dropout." in f".{name}." and isinstance(m, torch.nn.Dropout)]


@contextlib.contextmanager
def dropout_off(model):
    """LoRA's dropout off for a pass that must be deterministic (old and reference
    log-probs); the training forwards keep it."""
    modules = [m for m in dropout_modules(model) if m.training]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module in modules:
            module.train()


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model's forward: peft's `disable_adapter()` (the adapter's layers are
    bypassed, nothing is copied). Their `requires_grad` comes back on exit."""
    peft_model = peft_of(model)
    with peft_model.disable_adapter():
        yield


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


def trainable_count(model) -> int:
    """Trainable parameters (full sizes: a DTensor shard's numel is the global one)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of this process's optimizer state (AdamW: two moments per trainable element).
    Scalar entries (the step counters, one per tensor on every rank) are left out, so the
    sum over ranks does not depend on the world size."""
    import torch

    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total
