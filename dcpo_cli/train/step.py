"""`dcpo train-step`: one policy update from a rollout step's scored shards.

`run_train_step` reads top to bottom in the order of the work, which is also the order of
crash safety: read and check the inputs -> decide from CKPT and STATE whether this step is
new, already trained, or already done -> advantages (SAS state in memory) -> old log-probs
-> mini-batch updates -> write CKPT atomically (the commit point; it holds a snapshot of the
new SAS state) -> write STATE atomically -> append the metrics log once. A run killed
anywhere and re-run with the same arguments ends with the same files as an uninterrupted
run, and STATE never absorbs a step twice.

Each concern lives in its own module of train/: `inputs` (scored shards, advantages),
`resume` (idempotence), `update` (the passes over the model), `records` (metrics and
records), `reference` (the KL reference); the policy itself (building it, AdamW and the lr
schedule, LoRA) is `dcpo_cli.policy`, the checkpoint directory `files.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from dcpo_cli.core import algorithms, mismatch
from dcpo_cli.core.logprobs import check_plain_lm_head
from dcpo_cli.core.presets import AlgoConfig
from dcpo_cli.errors import DcpoError
from dcpo_cli.files import contracts, lora_adapter
from dcpo_cli.files.checkpoint import (
    has_training_state,
    is_checkpoint,
    load_training_state,
    prune_training_states,
    read_trainer_state,
    save_checkpoint,
)
from dcpo_cli.files.model_source import ModelSource, resolve_model
from dcpo_cli.files.sas_state import SasState
from dcpo_cli.options import TrainOptions
from dcpo_cli.parallel import distributed
from dcpo_cli.policy import lora
from dcpo_cli.policy.build import build_policy, device_and_dtype, vocab_size
from dcpo_cli.policy.optim import (
    build_optimizer,
    optimizer_state_bytes,
    scheduled_lr,
    set_hyperparameters,
)
from dcpo_cli.trackers.base import TRAIN, tracker_values
from dcpo_cli.train import reference
from dcpo_cli.train.inputs import (  # noqa: F401  (StepData, load_scored: public here too)
    StepAdvantages,
    StepData,
    check_vocab,
    compute_advantages,
    load_scored,
    select_groups,
)
from dcpo_cli.train.records import (
    METRICS,
    RECORDS,
    metrics_table,
    mismatch_report,
    records_table,
    step_metrics,
)
from dcpo_cli.train.resume import (
    SAS_SNAPSHOT,
    align_state_with_model,
    append_metrics_once,
    copy_atomic,
    resume_decision,
    state_checksum,
)
from dcpo_cli.train.staleness import step_staleness
from dcpo_cli.train.update import (  # noqa: F401  (forward_logprobs: public here too)
    StepContext,
    UpdateState,
    forward_logprobs,
    old_logprobs,
    plan_updates,
    reduce_across_ranks,
    run_updates,
)

__all__ = ["Outcome", "TrainOptions", "load_scored", "metrics_table", "run_train_step"]


class KeptPolicy(Protocol):
    """A policy its caller keeps in memory (`dcpo run`), standing in for a checkpoint."""

    def take(self, model_dir: Path) -> tuple[Policy, dict[str, Any]] | None:
        """The policy and trainer state the checkpoint `model_dir` holds, or None."""


class MetricsSink(Protocol):
    """Where rank 0 mirrors a step's metrics (experiment trackers)."""

    def log(self, kind: str, values: dict[str, Any], step: int) -> None: ...


@dataclass
class Outcome:
    status: str  # "trained", "synced" (already trained; state synced) or "done"
    metrics: dict[str, Any]
    out: Path
    policy: Policy | None = None  # the updated policy when "trained" (`dcpo run` keeps it)


@dataclass
class Policy:
    """The model and optimizer to update, and where the schedule stands."""

    model: Any
    tokenizer: Any
    optimizer: Any
    device: torch.device
    autocast_dtype: torch.dtype | None
    global_step: int  # train steps before this one
    updates_before: int  # optimizer updates before this step
    lr: float  # this step's learning rate
    base_model: str  # the weights the run started from: a Hub id, or a directory
    base_model_revision: str | None  # the Hub commit (None for a directory)
    runner: Any = None  # under torchrun: the FSDP2 root to call (fsdp.Scorer); else None

    @property
    def forward_model(self) -> Any:
        return self.model if self.runner is None else self.runner


def run_train_step(model: str | Path | ModelSource, scored: list[Path], state_path: Path,
                   out: Path, options: TrainOptions, *, show_progress: bool = True,
                   resident: KeptPolicy | None = None, trackers: MetricsSink | None = None
                   ) -> Outcome:
    """`model`: a directory, a checkpoint or a Hub id[@revision] (resolved here, once).

    Under torchrun every rank runs this; rank 0 alone decides whether the step is new (and
    tells the others) and alone writes files, apart from each rank's training-state shard.
    `resident` (`dcpo run`): a `KeptPolicy` whose in-memory policy replaces loading `model`
    when it is exactly what the `model` checkpoint holds; the updated policy comes back in
    `Outcome.policy`. `trackers` (a `MetricsSink`, `trackers.session.Trackers`): where rank 0
    mirrors the metrics after the metrics log (a step logged before is not logged again)."""
    started = time.perf_counter()
    world = distributed.init()
    state_path, out = Path(state_path), Path(out)
    given = model.path if isinstance(model, ModelSource) else Path(model)
    if out.resolve() == given.resolve():
        raise DcpoError("--out must differ from --model (checkpoints are never overwritten)")
    config = resolve_algo(options)
    data = select_groups(load_scored(scored), config, options.target_prompts)
    check_rollout_correction(data, options)
    state = SasState.load(state_path)

    decision = distributed.on_main(lambda: resume_decision(out, state_path, data, state))
    if decision != "fresh":  # a finished step needs no model (a loop re-run may have pruned it)
        return _finish_resumed(decision, out, state_path, options, trackers)
    source = resolve_model(model)  # before anything is written: a bad id leaves no trace
    model_dir = source.path
    staleness = step_staleness(data, source, options.max_staleness)
    # "auto" becomes the step's own correction (recorded so in the checkpoint)
    options = dataclasses.replace(options, rollout_correction=mismatch.resolve_correction(
        options.rollout_correction, staleness))
    check_rollout_correction(data, options)
    options = lora_options(source, options)

    def aligned() -> tuple[SasState, str | None]:
        aligned_state = align_state_with_model(model_dir, state_path, state) \
            if is_checkpoint(model_dir) else state
        return aligned_state, state_checksum(state_path)

    state, state_before = distributed.on_main(aligned)

    load_started = time.perf_counter()
    kept = resident.take(model_dir) if resident is not None else None
    if kept is not None:
        check_vocab(data, vocab_size(kept[0].model))
        policy = continue_schedule(*kept, options)
    else:
        policy = load_policy(source, options, data)
    ref = choose_reference(source, options, config, policy)
    load_seconds = time.perf_counter() - load_started

    advantages = compute_advantages(data, config, state, state_path)
    # LoRA's dropout makes the training forward random: the old log-probs then get their
    # own (dropout-free) pass instead of reusing the first mini-batch's forward
    ctx = StepContext(policy.forward_model, data, config, options, advantages.values,
                      policy.device, policy.autocast_dtype,
                      stochastic=bool(lora.dropout_modules(policy.model)))
    update = UpdateState()
    compute_started = time.perf_counter()
    plans = plan_updates(ctx, advantages.groups)
    policy.model.train()  # for gradient checkpointing; build_policy turned dropout off
    with _progress(show_progress) as bar:
        if ref.source is not None:  # loaded, used and freed before the policy's passes
            ctx.ref = reference.step_reference_logprobs(ref.source, ctx, plans,
                                                        vocab_size(policy.model), bar)
        elif ref.adapter_off:  # LoRA: the base model is the policy with its adapter off
            ctx.ref = reference.base_logprobs(policy.model, ctx, plans, bar)
        with lora.dropout_off(policy.model):
            old_logprobs(ctx, plans, update, bar)
        run_updates(ctx, policy.optimizer, plans, update, bar)
    reduce_across_ranks(update)
    trained = trained_figures(policy)
    if ctx.ref is not None:  # each rank computed its own rows'; the metric reads them all
        ctx.ref = _merged_on_main(ctx.ref)
    compute_seconds = distributed.all_reduce_max(time.perf_counter() - compute_started)

    metrics = step_metrics(data, advantages, update, options.algo)
    metrics.update(mismatch_report(data, update), rollout_temperature=data.temperature,
                   staleness=staleness,
                   kl_ref=None if ctx.ref is None else reference.kl_ref(update.old, ctx.ref,
                                                                        config.kl_type))
    metrics.update(step=data.step, lr=policy.lr, global_step=policy.global_step + 1,
                   optimizer_updates=policy.updates_before + update.updates,
                   checkpoint=str(out.resolve()),
                   tokens_per_second=update.tokens / max(compute_seconds, 1e-9),
                   compute_seconds=compute_seconds, load_seconds=load_seconds,
                   seconds=time.perf_counter() - started,  # up to here; saving follows
                   world_size=world.world_size, **trained, **_peak_memory())
    trainer_state = _trainer_state(policy, data, config, options, update.updates, state_before)
    if ref.chosen is not None:
        trainer_state.update(ref.chosen.record())
    # The line of checkpoints --keep-training-state prunes (checkpoint.prune_training_states)
    trainer_state["parent_checkpoint"] = model_dir.name if is_checkpoint(model_dir) else None

    def write_extra(tmp: Path) -> None:  # inside the checkpoint, before it is committed
        contracts.write_table(records_table(data, advantages.values, update,
                                            options.rollout_correction,
                                            options.rollout_correction_cap, staleness),
                              tmp / RECORDS,
                              contracts.make_metadata("train_records", "train-step",
                                                      step=data.step, options=options.record(),
                                                      inputs=scored))
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True,
                                              default=str) + "\n")
        advantages.new_state.save(tmp / SAS_SNAPSHOT)

    save_checkpoint(out, policy.model, policy.tokenizer, policy.optimizer, trainer_state,
                    write_extra)
    if world.is_main:
        copy_atomic(out / SAS_SNAPSHOT, state_path)  # the snapshot is the state, byte for byte
        if options.metrics_log:
            append_metrics_once(options.metrics_log, metrics)
        report(trackers, metrics)
        prune_training_states(out, options.keep_training_state)  # after the commit
    distributed.barrier()
    return Outcome("trained", metrics, out, policy)


def _merged_on_main(rows: dict) -> dict:
    """Every rank's per-row values on rank 0 (this rank's own elsewhere)."""
    parts = distributed.gather_object(rows)
    if parts is None:
        return rows
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def _peak_memory() -> dict[str, Any]:
    """Each rank's peak memory (a list, in rank order) and the largest, for the metrics."""
    mine = distributed.peak_memory()
    ranks = distributed.gather_object(mine) or [mine]
    result: dict[str, Any] = {}
    for key in mine:
        values = [r[key] for r in ranks]
        result[key] = max(values)
        result[f"{key}_per_rank"] = values
    return result


def trained_figures(policy: Policy) -> dict[str, Any]:
    """What the step trained and what that costs in optimizer memory (all ranks' state)."""
    state_bytes = distributed.all_reduce_sum([optimizer_state_bytes(policy.optimizer)])
    return {"trainable_parameters": lora.trainable_count(policy.model),
            "parameters": sum(p.numel() for p in policy.model.parameters()),
            "optimizer_state_bytes": int(state_bytes[0]),
            "lora_rank": (lora.settings_of(policy.model) or {}).get("lora_rank")}


def lora_options(source: ModelSource, options: TrainOptions) -> TrainOptions:
    """The LoRA settings of this step, checked before anything is loaded: a LoRA checkpoint
    continues with its own (given ones must match it), and with LoRA the KL reference is the
    base model (the adapter disabled), so another --ref-model is refused."""
    base = reference.Reference(source.name, source.commit)
    if lora_adapter.is_adapter(source.path):
        recorded = lora_adapter.checkpoint_settings(source.path)
        config = lora_adapter.adapter_config(source.path)
        base = reference.Reference(config["base_model_name_or_path"], config.get("revision"))
        if options.lora_rank is None:
            options = dataclasses.replace(options, **recorded)
        else:
            for key, value in recorded.items():
                given = getattr(options, key)
                same = lora.same_targets(given, value) if key == "lora_target_modules" \
                    else float(given) == float(value)
                if not same:
                    raise DcpoError(f"--{key.replace('_', '-')} {given}: {source.spec} is a LoRA "
                                    f"checkpoint with {key} = {value} "
                                    f"({lora_adapter.ADAPTER_CONFIG}); every step of a run uses "
                                    "the same LoRA settings")
    if options.lora_rank is not None and options.ref_model is not None:
        given = resolve_model(options.ref_model)
        if reference.Reference(given.name, given.commit) != base:
            raise DcpoError(f"--ref-model {options.ref_model}: with LoRA the KL reference is "
                            f"the policy's base model {base.spec} with the adapter disabled; "
                            "leave --ref-model out or name that base")
    return options


def resolve_algo(options: TrainOptions) -> AlgoConfig:
    """The algorithm of --algo and its overrides (a bad value: `FieldError`, naming it)."""
    try:
        return algorithms.resolve_config(options.algo, **options.overrides)
    except (ValueError, KeyError, TypeError) as exc:
        raise DcpoError(str(exc).strip("'\"")) from None


def check_rollout_correction(data: StepData, options: TrainOptions) -> None:
    """Refuse a correction without the sampler's log-probs ("auto" is checked once the
    staleness has resolved it)."""
    if options.rollout_correction not in ("none", "auto") and data.sampler_logprobs is None:
        raise DcpoError(f"{data.sampler_missing}; --rollout-correction "
                        f"{options.rollout_correction} needs the sampler's log-probs")


@dataclass
class StepReference:
    chosen: reference.Reference | None  # recorded in the trainer state (None: nothing yet)
    source: ModelSource | None  # to load this step (None: kl_coef is 0, or LoRA)
    adapter_off: bool = False  # LoRA with the KL on: the policy with its adapter disabled


def choose_reference(source: ModelSource, options: TrainOptions, config: AlgoConfig,
                     policy: Policy) -> StepReference:
    """The KL reference: resolved only when kl_coef > 0; otherwise the one a checkpoint
    recorded (if any) is carried on, so a later step with the KL finds the same one. With
    LoRA it is the base model (checked in `lora_options`), computed by the policy itself."""
    if not config.kl_coef:
        return StepReference(reference.recorded_reference(source.path), None)
    base = reference.Reference(policy.base_model, policy.base_model_revision)
    if lora_adapter.peft_of(policy.model) is not None:
        return StepReference(base, None, adapter_off=True)
    chosen, ref_source = reference.choose_reference(options.ref_model, source.path, base,
                                                    source)
    return StepReference(chosen, ref_source)


def report(trackers: MetricsSink | None, metrics: dict[str, Any]) -> None:
    """The step's metrics to the trackers, at its global step (after the files: a tracker
    never stands in for them; one that fails only warns)."""
    if trackers:
        trackers.log(TRAIN, tracker_values("train", metrics), metrics["global_step"])


def _finish_resumed(decision: str, out: Path, state_path: Path, options: TrainOptions,
                    trackers: MetricsSink | None = None) -> Outcome:
    """CKPT is already written: finish the state update ("sync"), the metrics log and the
    pruning of older training states (rank 0 alone)."""
    metrics = json.loads((out / METRICS).read_text())
    if distributed.world().is_main:
        if decision == "sync":
            copy_atomic(out / SAS_SNAPSHOT, state_path)
        if options.metrics_log:
            append_metrics_once(options.metrics_log, metrics)
        report(trackers, metrics)  # a process killed before it got there logs it now
        prune_training_states(out, options.keep_training_state)
    distributed.barrier()
    return Outcome("synced" if decision == "sync" else "done", metrics, out)


def load_policy(source: ModelSource, options: TrainOptions, data: StepData) -> Policy:
    """The model (checked against the step's tokens), and an optimizer that continues a
    train-step checkpoint's state or starts fresh from --seed. Under torchrun the model is
    sharded with FSDP2 before the optimizer is built over its (sharded) parameters; a
    checkpoint's fp32 master weights and moments then load onto this world, whatever world
    wrote them."""
    model_dir = source.path
    world = distributed.world()
    trainer = read_trainer_state(model_dir) if is_checkpoint(model_dir) else None
    if trainer is not None and not has_training_state(model_dir) \
            and not options.reset_optimizer:
        raise DcpoError(f"{model_dir}: holds no training state (deleted by "
                        "--keep-training-state); continue from a newer checkpoint, or pass "
                        "--reset-optimizer to start fresh optimizer moments from its weights")
    if options.cpu_offload and not torch.cuda.is_available():
        raise DcpoError("--cpu-offload moves FSDP2's shards from the GPU to host memory; "
                        "without a GPU everything is in host memory already: drop it")
    if options.cpu_offload and not world.sharded:
        raise DcpoError("--cpu-offload needs FSDP2: run under torchrun or with "
                        "--nproc-per-node N")
    device, autocast_dtype = device_and_dtype()
    model, tokenizer = build_policy(model_dir, torch.device("cpu") if options.cpu_offload
                                    else device, options.gradient_checkpointing)
    check_plain_lm_head(model)
    check_vocab(data, vocab_size(model))
    if options.lora_rank is not None and lora_adapter.peft_of(model) is None:
        if trainer is not None:
            raise DcpoError(f"{model_dir}: a full fine-tuning checkpoint; --lora-rank starts "
                            "LoRA from a base model (or continues a LoRA checkpoint)")
        torch.manual_seed(options.seed)  # the adapter's A matrices (B starts at zero)
        model = lora.wrap(model, options.lora_rank, options.lora_alpha, options.lora_dropout,
                          options.lora_target_modules, base_name=source.name,
                          base_revision=source.commit)
    runner = None
    if world.sharded:
        from dcpo_cli.parallel.fsdp import shard_policy

        runner = shard_policy(model, options.cpu_offload)
    optimizer = build_optimizer(model, options.lr, options.weight_decay)
    if trainer is not None:
        if has_training_state(model_dir):
            load_training_state(model_dir, model, optimizer,
                                with_optimizer=not options.reset_optimizer)
    else:
        torch.manual_seed(options.seed)
    policy = Policy(model, tokenizer, optimizer, device, autocast_dtype, 0, 0, options.lr,
                    source.name, source.commit, runner)
    return continue_schedule(policy, trainer, options)


def continue_schedule(policy: Policy, trainer: dict[str, Any] | None, options: TrainOptions
                      ) -> Policy:
    """Where the schedule stands after the checkpoint `trainer` (None: a fresh start): global
    step, updates, this step's lr and weight decay set on the optimizer, the base model."""
    global_step, updates_before = ((trainer["global_step"], trainer["optimizer_updates"])
                                   if trainer else (0, 0))
    lr = scheduled_lr(options.lr, global_step, options.warmup_steps)
    set_hyperparameters(policy.optimizer, lr, options.weight_decay)
    if trainer:
        policy = dataclasses.replace(policy, base_model=trainer["base_model"],
                                     base_model_revision=trainer.get("base_model_revision"))
    return dataclasses.replace(policy, global_step=global_step, updates_before=updates_before,
                               lr=lr)


def _trainer_state(policy: Policy, data: StepData, config: AlgoConfig, options: TrainOptions,
                   updates: int, state_before: str | None) -> dict[str, Any]:
    """What a later train-step continues from (and checks), saved in the checkpoint."""
    return {
        "global_step": policy.global_step + 1,
        "optimizer_updates": policy.updates_before + updates,
        "rollout_step": data.step,
        "lr": policy.lr,
        "base_lr": options.lr,
        "lr_schedule": "linear warm-up over train steps, then constant",
        "warmup_steps": options.warmup_steps,
        "algo": options.algo,
        "algo_config": dataclasses.asdict(config),
        "options": options.record(),
        "scored_checksums": data.checksums,
        "state_before_checksum": state_before,
        # the weights the run started from: a Hub id and commit, or a directory
        "base_model": policy.base_model,
        "base_model_revision": policy.base_model_revision,
    }


def _progress(show: bool):
    import contextlib

    from dcpo_cli.console import progress

    return progress() if show else contextlib.nullcontext()
