"""Policy building, loading and saving: the one place that knows what a checkpoint holds.

A train-step checkpoint is a Hugging Face model directory (safetensors, config, generation
config, tokenizer; `from_pretrained` and vLLM load it as is) plus, beside the weights:

- `optimizer.pt`      AdamW state (moments, per-parameter step counts)
- `rng_state.pt`      torch CPU (and CUDA) generator states and Python's `random` state
- `trainer_state.json` global step, optimizer updates, rollout step absorbed, lr schedule,
                      algorithm config, the scored inputs' checksums (for idempotent re-runs)
- `train_records.parquet`, `metrics.json`, `sas_state.json` (written by train_step)

The lr schedule is a pure function of the global step (see `scheduled_lr`), so it needs no
state file of its own: `trainer_state.json` holds everything it depends on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from dcpo_cli.errors import DcpoError, first_line

TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.pt"
RNG_STATE = "rng_state.pt"
TRAINER_FORMAT = "dcpo-trainer-state"


def is_checkpoint(directory: Path) -> bool:
    return (Path(directory) / TRAINER_STATE).is_file()


def read_trainer_state(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DcpoError(f"{path}: unreadable trainer state ({exc})") from None
    if state.get("format") != TRAINER_FORMAT:
        raise DcpoError(f"{path}: not a dcpo trainer state")
    return state


def check_model_dir(directory: Path) -> None:
    directory = Path(directory)
    if not directory.is_dir():
        raise DcpoError(f"{directory}: no such model directory")
    if not (directory / "config.json").is_file():
        raise DcpoError(f"{directory}: not a model directory (no config.json)")
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise DcpoError(f"{directory}: not a model directory (no weights)")


def device_and_dtype() -> tuple[torch.device, torch.dtype | None]:
    """fp32 on CPU; on GPU fp32 master weights with bf16 autocast (the returned dtype)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), None


def build_policy(directory: Path, device: torch.device, gradient_checkpointing: bool = False):
    """Load model and tokenizer from a model directory (a base model or a checkpoint).

    The one place a policy is built: wrapping it for FSDP2 (`fully_shard` per decoder layer)
    would happen here.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is the one on screen
    check_model_dir(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        reason = first_line(exc)
        raise DcpoError(f"{directory}: cannot load the model ({reason})") from None
    model.to(device)
    model.config.use_cache = False
    disable_dropout(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def disable_dropout(model) -> None:
    """A deterministic forward in train mode: the old log-probs (and the first mini-batch's
    reuse of its own forward as them) assume that the same weights give the same numbers.
    The saved config keeps its values; only this process's modules change."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):  # transformers' functional dropouts
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def vocab_size(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def build_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay on every parameter, as the paper's verl actor does.
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                             betas=(0.9, 0.999), eps=1e-8)


def scheduled_lr(base_lr: float, global_step: int, warmup_steps: int) -> float:
    """Linear warm-up counted in train steps (rollout steps), as the paper's 10 warm-up steps:
    train step k (0-based) uses base_lr * min(1, (k + 1) / warmup_steps), then constant.
    Every optimizer update within one train step uses the same lr. (The first step trains
    with base_lr / warmup_steps rather than 0.)"""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (global_step + 1) / warmup_steps)


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float
                        ) -> None:
    """This step's lr and --weight-decay; loading a checkpoint's optimizer state would
    otherwise bring back the values it was saved with."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore optimizer moments and RNG states from a train-step checkpoint."""
    directory = Path(directory)
    try:
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER, map_location="cpu",
                                             weights_only=True))
        rng = torch.load(directory / RNG_STATE, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        reason = first_line(exc)
        raise DcpoError(f"{directory}: broken checkpoint training state ({reason})") from None
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])
    # Moments were loaded to CPU; move them beside their parameters.
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                state[key] = value.to(next(iter(optimizer.param_groups[0]["params"])).device)


def rng_snapshot() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
    }


def save_checkpoint(out: Path, model, tokenizer, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], write_extra=None) -> None:
    """Write the whole checkpoint directory atomically: it appears complete or not at all.

    `write_extra(tmp_dir)` adds the step's own files (records, metrics, SAS snapshot) inside
    the same atomic directory. The one place a checkpoint is saved (under FSDP2, rank 0
    would gather a full state dict here).
    """
    from dcpo_cli.contracts import atomic_path

    with atomic_path(out) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        torch.save(rng_snapshot(), tmp / RNG_STATE)
        if write_extra is not None:
            write_extra(tmp)
        # Last, so a directory with trainer_state.json is one this function finished.
        state = {"format": TRAINER_FORMAT, "version": 1, **trainer_state}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
