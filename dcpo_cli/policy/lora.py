"""LoRA through Hugging Face peft: wrapping a policy with a fresh adapter, loading a
checkpoint's adapter into its base, and what the update needs of it (dropout off, the
adapter disabled for the KL reference).

In train-step the policy is the transformers model with peft's LoRA layers injected in place
(`peft_model.get_base_model()`): the chunked log-prob code, FSDP2's per-layer sharding and the
DCP training state see the usual module tree, with only the adapter's parameters trainable.
The `PeftModel` that wraps it rides along as `model.dcpo_peft` (an attribute outside the
module tree, `lora_adapter.peft_of`) for what needs peft: saving the adapter, and
`disable_adapter()`, which gives the base model's log-probs for the KL reference without a
second copy of the weights. The adapter directory on disk is `dcpo_cli.files.lora_adapter`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from dcpo_cli.errors import DcpoError
from dcpo_cli.files.lora_adapter import PEFT_ATTRIBUTE, adapter_config, peft_of

ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output head


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
    object.__setattr__(model, PEFT_ATTRIBUTE, peft_model)
    return model


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


def trainable_count(model) -> int:
    """Trainable parameters (full sizes: a DTensor shard's numel is the global one)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
