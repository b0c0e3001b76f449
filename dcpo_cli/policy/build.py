"""Building a policy: a model directory (a base model or a train-step checkpoint) loaded as
fp32 master weights on this process's device, ready to train.

With LoRA the checkpoint is an adapter directory: its base is built, and the adapter
injected trainable (`policy.lora`). The checkpoint directory itself (what it holds, reading
and writing it) is `dcpo_cli.files.checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dcpo_cli.errors import DcpoError, first_line
from dcpo_cli.files import lora_adapter
from dcpo_cli.files.checkpoint import check_model_dir, stored_dtype
from dcpo_cli.parallel import distributed
from dcpo_cli.policy import lora


def device_and_dtype() -> tuple[torch.device, torch.dtype | None]:
    """fp32 on CPU; on GPU fp32 master weights with bf16 autocast (the returned dtype).
    Under torchrun each process uses its LOCAL_RANK's GPU, and FSDP2's mixed precision
    casts to bf16 instead of autocast (parallel/fsdp.py)."""
    world = distributed.world()
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        return device, None if world.sharded else torch.bfloat16
    return torch.device("cpu"), None


def build_policy(directory: Path, device: torch.device, gradient_checkpointing: bool = False):
    """Load model and tokenizer from a model directory (a base model or a checkpoint).

    The weights are upcast to fp32 (master weights); the dtype they were stored in is kept
    as `model.dcpo_save_dtype`, the dtype `save_checkpoint` writes them back in. Under
    torchrun, `fsdp.shard_policy` then shards the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if lora_adapter.is_adapter(directory):  # a LoRA checkpoint: its base, adapter trainable
        model, tokenizer = build_policy(lora_adapter.base_source(directory).path, device,
                                        gradient_checkpointing)
        return lora.load(model, directory, trainable=True), tokenizer
    hf_logging.disable_progress_bar()  # our own progress bar is the one on screen
    check_model_dir(directory)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        reason = first_line(exc)
        raise DcpoError(f"{directory}: cannot load the model ({reason})") from None
    model.dcpo_save_dtype = stored_dtype(directory)
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
