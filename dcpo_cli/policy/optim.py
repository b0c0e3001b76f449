"""The optimizer and its learning-rate schedule: AdamW over the trainable parameters, the
warm-up a pure function of the global step (so `trainer_state.json` holds all it depends on
and no scheduler state is saved).
"""

from __future__ import annotations

import torch


def build_optimizer(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay on every trained parameter, as the paper's verl actor does (with LoRA: the
    # adapter's; the frozen base has no optimizer state).
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                             weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)


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


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of this process's optimizer state (AdamW: two moments per trainable element).
    Scalar entries (the step counters, one per tensor on every rank) are left out, so the
    sum over ranks does not depend on the world size."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                local = value.to_local() if hasattr(value, "to_local") else value
                total += local.numel() * local.element_size()
    return total
