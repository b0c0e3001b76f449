"""`dcpo export CKPT --out DIR`: a plain model directory from any checkpoint.

A LoRA checkpoint becomes its base model with the adapter merged in (W + alpha / r * B A,
computed in fp32 by peft's `merge_and_unload`, stored in the base's own dtype): a directory
that transformers, vLLM and every other tool load with no peft. A full fine-tuning
checkpoint keeps its weights; either way the training state, trainer files and records stay
behind. The output is written atomically and never over an existing directory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from dcpo_cli.errors import DcpoError, first_line
from dcpo_cli.files import lora_adapter
from dcpo_cli.files.model_source import resolve_model


@dataclass
class Exported:
    out: Path
    merged: bool  # a LoRA adapter was merged into its base
    base: str | None  # the LoRA checkpoint's base model
    parameters: int


def run_export(model: str | Path, out: Path) -> Exported:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from dcpo_cli.files.checkpoint import check_model_dir, stored_dtype, tied_copies
    from dcpo_cli.files.contracts import atomic_path
    from dcpo_cli.policy import lora

    out = Path(out)
    if out.exists():
        raise DcpoError(f"{out}: exists already; export writes a new directory")
    source = resolve_model(model)
    check_model_dir(source.path)
    adapter = lora_adapter.is_adapter(source.path)
    base = lora_adapter.base_source(source.path) if adapter else source
    try:
        network = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(base.path)
    except (OSError, ValueError) as exc:
        raise DcpoError(f"{base.path}: cannot load the model ({first_line(exc)})") from None
    if adapter:
        network = lora.load(network, source.path, trainable=False)
        network = lora_adapter.peft_of(network).merge_and_unload()
    dtype = stored_dtype(base.path)
    with contextlib.suppress(OSError):  # the base's own sampling defaults travel with it
        network.generation_config = GenerationConfig.from_pretrained(base.path)
    copies = tied_copies(network)
    weights = {k: v.to(dtype) for k, v in network.state_dict().items() if k not in copies}
    network.config.dtype = dtype
    with atomic_path(out) as tmp:
        tmp.mkdir()
        network.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Exported(out, adapter, lora_adapter.base_spec(source.path) if adapter else None,
                    sum(p.numel() for p in network.parameters()))
