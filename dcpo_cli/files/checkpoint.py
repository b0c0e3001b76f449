"""The checkpoint directory: the one place that knows what a checkpoint holds, reading and
writing it (building the policy it holds is `dcpo_cli.policy`).

A train-step checkpoint is a Hugging Face model directory (safetensors, config, generation
config, tokenizer; `from_pretrained` and vLLM load it as is), its weights in the model's own
dtype (`config.json`'s dtype: bf16 for Qwen, fp32 for the tiny model), or with LoRA a peft
adapter directory naming its base (`lora_adapter.py`), plus, beside them:

- `training_state/`   what continuing needs and evaluating does not, written with
                      torch.distributed.checkpoint (each rank its own shard; it loads onto
                      any number of ranks): the fp32 master weights and the AdamW state under
                      the model's parameter names, and `rng_state.pt` (rank 0's torch CPU and
                      CUDA generators, Python's `random`). `--keep-training-state K` deletes
                      it from older checkpoints of the run (`prune_training_states`).
- `trainer_state.json` global step, optimizer updates, rollout step absorbed, lr schedule,
                      algorithm config, the scored inputs' checksums (for idempotent re-runs)
- `train_records.parquet`, `metrics.json`, `sas_state.json` (written by train/step.py)

The lr schedule is a pure function of the global step (`policy.optim.scheduled_lr`), so it
needs no state file of its own: `trainer_state.json` holds everything it depends on.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from dcpo_cli.errors import DcpoError, first_line
from dcpo_cli.files import lora_adapter, weights_checksum
from dcpo_cli.parallel import distributed

TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training_state"
RNG_STATE = "rng_state.pt"  # inside training_state/
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
    if directory.is_dir() and lora_adapter.is_adapter(directory):
        return
    if not directory.is_dir():
        raise DcpoError(f"{directory}: no such model directory")
    if not (directory / "config.json").is_file():
        raise DcpoError(f"{directory}: not a model directory (no config.json)")
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("*.bin")):
        raise DcpoError(f"{directory}: not a model directory (no weights)")


def stored_dtype(directory: Path) -> torch.dtype:
    """The dtype a model directory's config names for its weights (fp32 if none)."""
    if lora_adapter.is_adapter(directory):
        return stored_dtype(lora_adapter.base_source(directory).path)
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    value = getattr(torch, str(name).replace("torch.", ""), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point \
        else torch.float32


def state_dict_options(model, **options):
    """DCP state-dict options: with LoRA only the trainable (adapter) parameters, so the
    training state holds no copy of the frozen base."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=lora_adapter.peft_of(model) is not None, **options)


def trainable_only(model, state: dict[str, Any]) -> dict[str, Any]:
    """With LoRA, a model state dict without the frozen base: `ignore_frozen_params` keeps
    a tied lm-head (the embedding matrix under its second name), which would put
    vocabulary x hidden floats into every checkpoint."""
    if lora_adapter.peft_of(model) is None:
        return state
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False)
              if not p.requires_grad}
    return {k: v for k, v in state.items() if k not in frozen}


def has_training_state(directory: Path) -> bool:
    return (Path(directory) / TRAINING_STATE / ".metadata").is_file()


def load_training_state(directory: Path, model, optimizer: torch.optim.Optimizer,
                        with_optimizer: bool = True) -> None:
    """Restore the fp32 master weights (over the weights loaded from the model directory,
    which may be bf16-rounded), the AdamW state unless `with_optimizer` is false
    (--reset-optimizer), and the RNG states, from a checkpoint's training_state/. Works on
    any number of ranks, whatever number wrote it (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    path = Path(directory) / TRAINING_STATE
    try:
        options = state_dict_options(model)
        # With LoRA the frozen base is not in the state (dcp.load has already refused a
        # state that lacks any trainable key): set the adapter's tensors alone
        set_options = state_dict_options(model, strict=not options.ignore_frozen_params)
        if with_optimizer:
            model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
            state = {"model": trainable_only(model, model_sd), "optimizer": optim_sd}
        else:
            state = {"model": trainable_only(model, get_model_state_dict(model,
                                                                         options=options))}
        with single_process_quiet():
            dcp.load(state, checkpoint_id=path)
        if with_optimizer:
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=set_options)
        else:
            set_model_state_dict(model, state["model"], options=set_options)
        rng = torch.load(path / RNG_STATE, map_location="cpu", weights_only=False)
    except (Exception, dcp.api.CheckpointException) as exc:  # noqa: BLE001 (DCP raises many)
        reason = first_line(exc).strip() or type(exc).__name__
        if "size" in reason or "Missing key" in reason or "shape" in reason \
                or "CheckpointException" in type(exc).__name__:
            raise DcpoError(f"{path}: a training state written for another model, or broken "
                            f"({reason[:200]})") from None
        raise DcpoError(f"{path}: broken checkpoint training state ({reason[:200]})") from None
    restore_rng(rng)


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the generators `rng_snapshot` captured (torch CPU, CUDA, Python's `random`)."""
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(rng["python"])


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
    the same atomic directory. Under torchrun every rank calls this: all write into one
    temporary directory (its name chosen on rank 0), rank 0 alone writes the model directory
    (from a full state dict) and the small files, every rank its shard of training_state/;
    rank 0 renames the directory into place once every rank is done.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    main = distributed.world().is_main
    with shared_atomic_dir(out) as tmp:
        full = trainable_only(model, get_model_state_dict(model, options=state_dict_options(
            model, full_state_dict=True, cpu_offload=True)))
        if main:
            if lora_adapter.peft_of(model) is not None:  # the adapter alone, in peft's layout
                lora_adapter.save_adapter(tmp, model, full)
            else:
                save_weights(tmp, model, full)
            tokenizer.save_pretrained(tmp)
        del full
        save_training_state(tmp / TRAINING_STATE, model, optimizer)
        if main:
            torch.save(rng_snapshot(), tmp / TRAINING_STATE / RNG_STATE)
            if write_extra is not None:
                write_extra(tmp)
            # Last, so a directory with trainer_state.json is one this function finished;
            # with the weights' checksums, which every later load verifies.
            state = {"format": TRAINER_FORMAT, "version": 2, **trainer_state,
                     weights_checksum.RECORD_KEY: weights_checksum.record(tmp)}
            (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")


def save_weights(directory: Path, model, full: dict[str, torch.Tensor]) -> None:
    """The model directory rollout and eval load: weights in the model's own dtype."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = getattr(model, "dcpo_save_dtype", torch.float32)
    copies = tied_copies(model)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()
               if k not in copies}
    saved_dtype = model.config.dtype
    model.config.dtype = dtype
    try:
        model.save_pretrained(directory, state_dict=weights, safe_serialization=True)
    finally:
        model.config.dtype = saved_dtype


def tied_copies(model) -> set[str]:
    """Names of parameters that are another parameter under a second name (a tied lm-head):
    a full state dict gathered from FSDP2 holds them as separate copies, which
    `save_pretrained` would then write twice."""
    seen: set[int] = set()
    copies = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            copies.add(name)
        seen.add(id(param))
    return copies


def save_training_state(directory: Path, model, optimizer: torch.optim.Optimizer) -> None:
    """fp32 master weights and optimizer state, each rank its own shard (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=state_dict_options(model))
    with single_process_quiet():
        dcp.save({"model": trainable_only(model, model_sd), "optimizer": optim_sd},
                 checkpoint_id=directory)


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns that it 'assumes the intent is to save in a single process' when there is
    no process group; that is exactly the intent of a train-step without torchrun."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@contextlib.contextmanager
def shared_atomic_dir(out: Path):
    """`contracts.atomic_path` for a directory that several ranks write: rank 0 makes the
    temporary directory and tells the others its name; after a barrier (everyone's files
    written) rank 0 renames it into place; a second barrier holds the others until then."""
    from dcpo_cli.files.contracts import atomic_path

    world = distributed.world()
    if not world.sharded:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            yield tmp
        return
    if world.is_main:
        with atomic_path(out) as tmp:
            tmp.mkdir()
            distributed.broadcast_object(str(tmp))
            yield tmp
            distributed.barrier()
        distributed.barrier()
    else:
        tmp = Path(distributed.broadcast_object(None))
        yield tmp
        distributed.barrier()
        distributed.barrier()


def prune_training_states(out: Path, keep: int) -> list[Path]:
    """Delete training_state/ from the older checkpoints of `out`'s own line beyond the
    newest `keep` (`out` counts as the first).

    The line is `out`, the checkpoint it continued from (`parent_checkpoint` in its trainer
    state), that one's parent, and so on, as long as they sit in `out`'s folder (the loop's
    --out folder): other runs and branches in the same folder are never touched. Called
    after a step has committed (checkpoint renamed into place and STATE written), and again
    by every later step, so a kill in between loses nothing and repeats the work. Weights,
    records and metrics stay. Each state is renamed away before it is removed, so a
    half-deleted state is never taken for a whole one."""
    line, current = [], Path(out)
    while current.is_dir() and len(line) < 1_000_000:
        trainer = None
        with contextlib.suppress(DcpoError):
            trainer = read_trainer_state(current)
        if trainer is None or current in line:
            break
        line.append(current)
        parent = trainer.get("parent_checkpoint")
        if not parent:
            break
        current = Path(out).parent / parent
    removed = []
    for ancestor in line[keep:]:
        state = ancestor / TRAINING_STATE
        if state.exists():
            state.rename(ancestor / f".{TRAINING_STATE}.deleting")
            removed.append(ancestor)
        shutil.rmtree(ancestor / f".{TRAINING_STATE}.deleting", ignore_errors=True)
    return removed
