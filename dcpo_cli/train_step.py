"""`dcpo train-step`: one policy update from a rollout step's scored shards.

Order of work (crash safety): read and check the inputs -> decide from CKPT and STATE whether
this step is new, already trained, or already done -> advantages (SAS state in memory) ->
old log-probs -> mini-batch updates -> write CKPT atomically (the commit point; it holds a
snapshot of the new SAS state) -> write STATE atomically -> append the metrics log once.
A run killed anywhere and re-run with the same arguments ends with the same files as an
uninterrupted run, and STATE never absorbs a step twice.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dcpo_cli import algorithms, files
from dcpo_cli.batching import (
    MicroBatch,
    collate,
    default_mini_batch_size,
    group_rows,
    micro_batches,
    mini_batches,
    shard,
)
from dcpo_cli.checkpoint import (
    build_optimizer,
    build_policy,
    device_and_dtype,
    is_checkpoint,
    load_training_state,
    read_trainer_state,
    save_checkpoint,
    scheduled_lr,
    set_hyperparameters,
    vocab_size,
)
from dcpo_cli.errors import DcpoError
from dcpo_cli.logprobs import (
    CHUNK_ELEMENTS,
    check_plain_lm_head,
    decoder_of,
    lm_head_of,
    token_entropy,
    token_logprobs,
)
from dcpo_cli.model_source import ModelSource, resolve_model
from dcpo_cli.sas_state import SasState

SAS_SNAPSHOT = "sas_state.json"
RECORDS = "train_records.parquet"
METRICS = "metrics.json"


@dataclass
class TrainOptions:
    algo: str = "dcpo"
    overrides: dict[str, Any] = field(default_factory=dict)  # AlgoConfig fields to change
    lr: float = 1e-6
    weight_decay: float = 0.1
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    mini_batch_size: int | None = None  # prompts per update; None: a quarter of the step's
    micro_batch_tokens: int = 8192
    epochs: int = 1
    seed: int = 0
    gradient_checkpointing: bool = False
    metrics_log: Path | None = None
    chunk_elements: int = CHUNK_ELEMENTS

    def record(self) -> dict[str, Any]:
        """The options that determine the result (recorded in the checkpoint)."""
        return {k: v for k, v in self.__dict__.items() if k != "metrics_log"}


@dataclass
class StepData:
    """A rollout step's scored responses, one entry per row across all shards."""

    step: int
    prompt_ids: list[str]
    sample_index: list[int]
    prompt_tokens: list[list[int]]
    response_tokens: list[list[int]]
    rewards: list[float]
    correct: list[bool]
    truncated: list[bool]
    files: list[str]  # the shard each row came from (for error messages)
    checksums: dict[str, str]
    max_new_tokens: int | None = None  # the rollouts' generation limit, from the metadata

    @property
    def num_rows(self) -> int:
        return len(self.prompt_ids)


@dataclass
class Outcome:
    status: str  # "trained", "synced" (already trained; state synced) or "done"
    metrics: dict[str, Any]
    out: Path


# ---------------------------------------------------------------- inputs


def load_scored(paths: list[Path]) -> StepData:
    """Read the scored shards of one rollout step and check they agree."""
    if not paths:
        raise DcpoError("give at least one --scored file")
    names = [Path(p).name for p in paths]
    if len({str(Path(p).resolve()) for p in paths}) != len(paths):
        raise DcpoError("the same --scored file is given twice")
    data = StepData(-1, [], [], [], [], [], [], [], [], {})
    steps: dict[str, int] = {}
    limits: set[int | None] = set()
    for path, name in zip(paths, names, strict=True):
        table = files.read_table(path, "scored")
        column_steps = set(table.column("step").to_pylist())
        metadata = files.read_metadata(path)
        meta_step = metadata.get("step")
        limits.add(metadata.get("max_new_tokens"))
        if len(column_steps) != 1:
            raise DcpoError(f"{name}: rows from several steps {sorted(column_steps)}")
        step = meta_step if isinstance(meta_step, int) else column_steps.pop()
        if meta_step is not None and {meta_step} != set(table.column("step").to_pylist()):
            raise DcpoError(f"{name}: metadata step {meta_step} differs from the 'step' column")
        steps[name] = step
        columns = table.select(["prompt_id", "sample_index", "prompt_token_ids",
                                "response_token_ids", "reward", "correct",
                                "finish_reason"]).to_pydict()
        for i, (prompt, response) in enumerate(zip(columns["prompt_token_ids"],
                                                   columns["response_token_ids"], strict=True)):
            if not prompt or not response:
                which = "prompt_token_ids" if not prompt else "response_token_ids"
                raise DcpoError(f"{name}: row {i} has an empty '{which}'")
        rewards = columns["reward"]
        if any(not math.isfinite(r) for r in rewards):
            raise DcpoError(f"{name}: column 'reward' holds NaN or infinite values")
        data.prompt_ids += columns["prompt_id"]
        data.sample_index += columns["sample_index"]
        data.prompt_tokens += columns["prompt_token_ids"]
        data.response_tokens += columns["response_token_ids"]
        data.rewards += [float(r) for r in rewards]
        data.correct += [bool(c) for c in columns["correct"]]
        data.truncated += [reason == "length" for reason in columns["finish_reason"]]
        data.files += [name] * table.num_rows
        data.checksums[name] = files.file_checksum(path)  # by name: a moved run resumes
    if len(set(steps.values())) != 1:
        listing = ", ".join(f"{n}: {s}" for n, s in steps.items())
        raise DcpoError(f"the scored files come from different steps ({listing})")
    data.step = next(iter(steps.values()))
    data.max_new_tokens = limits.pop() if len(limits) == 1 else None
    keys = list(zip(data.prompt_ids, data.sample_index, strict=True))
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise DcpoError(f"response ({dup[0]!r}, sample {dup[1]}) appears twice in the scored "
                        "files")
    return data


def check_vocab(data: StepData, vocab: int) -> None:
    for row in range(data.num_rows):
        for column, tokens in (("prompt_token_ids", data.prompt_tokens[row]),
                               ("response_token_ids", data.response_tokens[row])):
            bad = [t for t in tokens if t < 0 or t >= vocab]
            if bad:
                raise DcpoError(f"{data.files[row]}: '{column}' holds token id {bad[0]} outside "
                                f"the model's vocabulary of {vocab} "
                                f"(prompt {data.prompt_ids[row]!r})")


# ---------------------------------------------------------------- idempotence


def _state_checksum(path: Path) -> str | None:
    return files.file_checksum(path) if path.is_file() else None


def resume_decision(out: Path, state_path: Path, data: StepData, state: SasState) -> str:
    """"fresh" (train), "sync" (CKPT done, STATE behind) or "done" (both written).

    Raises when the step was already absorbed without this CKPT, or CKPT holds other work.
    """
    if out.exists():
        trainer = read_trainer_state(out) if out.is_dir() else None
        if trainer is None:
            raise DcpoError(f"{out}: exists and is not a train-step checkpoint; choose another "
                            "--out")
        if trainer.get("scored_checksums") != data.checksums:
            raise DcpoError(f"{out}: a checkpoint trained on other scored files already exists; "
                            "choose another --out")
        current = _state_checksum(state_path)
        if current == files.file_checksum(out / SAS_SNAPSHOT):
            return "done"
        if state.last_step is not None and state.last_step > data.step:
            return "done"  # a loop re-run: later steps have already moved STATE on
        if current == trainer.get("state_before_checksum"):
            return "sync"
        raise DcpoError(f"{state_path}: changed since {out.name} was written from it; "
                        "cannot sync the SAS state")
    if state.last_step is not None and state.last_step >= data.step:
        raise DcpoError(f"{state_path}: already absorbed step {state.last_step}; refusing to "
                        f"train on step {data.step} again")
    return "fresh"


def align_state_with_model(model_dir: Path, state_path: Path, state: SasState) -> SasState:
    """STATE must be the state the --model checkpoint left behind. If that checkpoint's own
    state update never happened (killed in between), finish it now; anything else would
    train on statistics that skipped or repeated a step."""
    snapshot = model_dir / SAS_SNAPSHOT
    if not snapshot.is_file():
        return state
    current = _state_checksum(state_path)
    if current == files.file_checksum(snapshot):
        return state
    trainer = read_trainer_state(model_dir) or {}
    if current == trainer.get("state_before_checksum"):
        _copy_atomic(snapshot, state_path)
        return SasState.load(state_path)
    raise DcpoError(f"{state_path}: is not the SAS state {model_dir.name} left behind (it holds "
                    f"step {state.last_step}, the checkpoint step {trainer.get('rollout_step')})"
                    "; pass this run's state file")


def _copy_atomic(source: Path, target: Path) -> None:
    with files.atomic_path(target) as tmp:
        tmp.write_bytes(source.read_bytes())


def append_metrics_once(log: Path, metrics: dict[str, Any]) -> None:
    """Append the step's metrics record unless a re-run already did (same step, same CKPT);
    a half-written last line left by a crash is dropped first."""
    log.parent.mkdir(parents=True, exist_ok=True)
    text = log.read_text() if log.is_file() else ""
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
        log.write_text(text)
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            old = json.loads(line)
            if old.get("step") == metrics["step"] and old.get("checkpoint") == \
                    metrics["checkpoint"]:
                return
    with open(log, "a") as handle:
        handle.write(json.dumps(metrics, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------- advantages


def compute_advantages(data: StepData, config, state: SasState, state_path: Path
                       ) -> tuple[list[float], list[list[int]], int, SasState]:
    """Advantage of every row, the groups to train on, how many groups were dropped, and the
    SAS state after this step.

    The state absorbs every group's rewards whatever the estimator, so a step is absorbed
    once and only once, and a later switch to SAS finds the history complete.
    """
    advantages = [0.0] * data.num_rows
    keep, dropped = [], 0
    updates = {}
    for rows in group_rows(data.prompt_ids):
        prompt_id = data.prompt_ids[rows[0]]
        if len(rows) < 2:
            raise DcpoError(f"{data.files[rows[0]]}: prompt {prompt_id!r} has a single "
                            "response; group advantages need at least 2 per prompt (--n >= 2)")
        rewards = torch.tensor([data.rewards[r] for r in rows], dtype=torch.float64)
        adv, updates[prompt_id] = algorithms.sas_advantages(rewards, state.get(prompt_id))
        if config.advantage == "grpo":
            adv = algorithms.grpo_advantages(rewards)
        for row, value in zip(rows, adv.tolist(), strict=True):
            advantages[row] = float(value)
        if config.drop_uniform_groups and bool((rewards == rewards[0]).all()):
            dropped += 1
        else:
            keep.append(rows)
    return advantages, keep, dropped, state.absorb(data.step, updates, state_path)


# ---------------------------------------------------------------- forward passes


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def forward_logprobs(model, batch: MicroBatch, chunk_elements: int, with_entropy: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Response-token log-probs laid out [B, Lmax] (0 on padding), and optionally the
    policy's entropy at each response token (flat, no grad). The lm-head is applied only at
    positions that predict response tokens, chunk by chunk (see logprobs.py)."""
    hidden = decoder_of(model)(input_ids=batch.input_ids,
                               attention_mask=batch.attention_mask).last_hidden_state
    picked = hidden[batch.predict_mask]
    weight, bias = lm_head_of(model)
    flat = token_logprobs(picked, weight, batch.targets, bias, chunk_elements)
    entropy = None
    if with_entropy:
        entropy = token_entropy(picked.detach(), weight.detach(),
                                None if bias is None else bias.detach(), chunk_elements)
    padded = flat.new_zeros(batch.response_mask.shape).masked_scatter(batch.response_mask, flat)
    return padded, entropy


def _rows_tensor(values: list[float], rows: list[int], mask: torch.Tensor) -> torch.Tensor:
    return torch.tensor([values[r] for r in rows], dtype=torch.float32,
                        device=mask.device)[:, None].expand(mask.shape)


# ---------------------------------------------------------------- the step


def run_train_step(model: str | Path | ModelSource, scored: list[Path], state_path: Path,
                   out: Path, options: TrainOptions, show_progress: bool = True) -> Outcome:
    """`model`: a directory, a checkpoint or a Hub id[@revision] (resolved here, once)."""
    started = time.perf_counter()
    state_path, out = Path(state_path), Path(out)
    given = model.path if isinstance(model, ModelSource) else Path(model)
    if out.resolve() == given.resolve():
        raise DcpoError("--out must differ from --model (checkpoints are never overwritten)")
    config = resolve_algo(options)
    data = load_scored(scored)
    state = SasState.load(state_path)

    decision = resume_decision(out, state_path, data, state)
    if decision != "fresh":  # a finished step needs no model (a loop re-run may have pruned it)
        metrics = json.loads((out / METRICS).read_text())
        if decision == "sync":
            _copy_atomic(out / SAS_SNAPSHOT, state_path)
        if options.metrics_log:
            append_metrics_once(options.metrics_log, metrics)
        return Outcome("synced" if decision == "sync" else "done", metrics, out)
    source = resolve_model(model)  # before anything is written: a bad id leaves no trace
    model_dir = source.path
    if is_checkpoint(model_dir):
        state = align_state_with_model(model_dir, state_path, state)
    state_before = _state_checksum(state_path)

    device, autocast_dtype = device_and_dtype()
    load_started = time.perf_counter()
    model, tokenizer = build_policy(model_dir, device, options.gradient_checkpointing)
    check_plain_lm_head(model)
    check_vocab(data, vocab_size(model))
    trainer = read_trainer_state(model_dir) if is_checkpoint(model_dir) else None
    optimizer = build_optimizer(model, options.lr, options.weight_decay)
    if trainer is not None:
        load_training_state(model_dir, optimizer)
        global_step, updates_before = trainer["global_step"], trainer["optimizer_updates"]
    else:
        torch.manual_seed(options.seed)
        global_step, updates_before = 0, 0
    lr = scheduled_lr(options.lr, global_step, options.warmup_steps)
    set_hyperparameters(optimizer, lr, options.weight_decay)
    load_seconds = time.perf_counter() - load_started

    advantages, groups, dropped, new_state = compute_advantages(data, config, state,
                                                                state_path)
    compute_started = time.perf_counter()
    stats = _update(model, optimizer, data, config, options, advantages, groups, device,
                    autocast_dtype, show_progress)
    compute_seconds = time.perf_counter() - compute_started

    metrics = _metrics(data, advantages, stats, config, options, lr, dropped, len(groups))
    metrics.update(step=data.step, global_step=global_step + 1,
                   optimizer_updates=updates_before + stats["updates"],
                   checkpoint=str(out.resolve()),
                   tokens_per_second=stats["tokens"] / max(compute_seconds, 1e-9),
                   compute_seconds=compute_seconds, load_seconds=load_seconds,
                   seconds=time.perf_counter() - started)  # up to here; saving follows
    trainer_state = {
        "global_step": global_step + 1,
        "optimizer_updates": updates_before + stats["updates"],
        "rollout_step": data.step,
        "lr": lr,
        "base_lr": options.lr,
        "lr_schedule": "linear warm-up over train steps, then constant",
        "warmup_steps": options.warmup_steps,
        "algo": options.algo,
        "algo_config": _config_dict(config),
        "options": options.record(),
        "scored_checksums": data.checksums,
        "state_before_checksum": state_before,
        # the weights the run started from: a Hub id and commit, or a directory
        "base_model": trainer["base_model"] if trainer else source.name,
        "base_model_revision": trainer.get("base_model_revision") if trainer else source.commit,
    }

    def write_extra(tmp: Path) -> None:
        files.write_table(_records_table(data, advantages, stats), tmp / RECORDS,
                          files.make_metadata("train_records", "train-step", step=data.step,
                                              options=options.record(), inputs=scored))
        (tmp / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True,
                                              default=str) + "\n")
        new_state.save(tmp / SAS_SNAPSHOT)

    save_checkpoint(out, model, tokenizer, optimizer, trainer_state, write_extra)
    _copy_atomic(out / SAS_SNAPSHOT, state_path)  # the snapshot is the state, byte for byte
    if options.metrics_log:
        append_metrics_once(options.metrics_log, metrics)
    return Outcome("trained", metrics, out)


def resolve_algo(options: TrainOptions):
    try:
        return algorithms.resolve_config(options.algo, **options.overrides)
    except (ValueError, KeyError, TypeError) as exc:
        raise DcpoError(str(exc).strip("'\"")) from None


def _config_dict(config) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def _update(model, optimizer, data: StepData, config, options: TrainOptions,
            advantages: list[float], groups: list[list[int]], device, autocast_dtype,
            show_progress: bool) -> dict[str, Any]:
    """Old log-probs, then `epochs` passes of mini-batch updates; returns what was measured."""
    from dcpo_cli.console import progress

    lengths = [len(p) + len(r) for p, r in zip(data.prompt_tokens, data.response_tokens,
                                               strict=True)]
    size = options.mini_batch_size or default_mini_batch_size(len(groups))
    plans = [mini_batches(groups, size, options.seed, data.step, epoch)
             for epoch in range(options.epochs)] if groups else []
    max_length = dr_grpo_length(data) if config.loss_agg == "seq-mean-token-sum-norm" else None
    old: dict[int, torch.Tensor] = {}
    entropy_sum, entropy_count = 0.0, 0
    stats: dict[str, Any] = {
        "updates": 0, "tokens": 0, "grad_norms": [], "losses": [],
        "clip_counts": dict.fromkeys(algorithms.CLIP_COUNTS, 0), "kl_sum": 0.0,
        "row_clipped": {}, "row_new": {}, "entropy": float("nan"),
    }
    params = [p for p in model.parameters() if p.requires_grad]

    def micro_plan(rows: list[int]) -> list[MicroBatch]:
        parts = shard(micro_batches(rows, lengths, options.micro_batch_tokens))
        return [collate(part, data.prompt_tokens, data.response_tokens,
                        _pad_id(model)).to(device) for part in parts]

    model.train()  # for gradient checkpointing; build_policy turned dropout off
    total_updates = sum(len(p) for p in plans)
    bar = progress() if show_progress else contextlib.nullcontext()
    with bar:
        # Old log-probs of every trained response with the weights before any update. The
        # first mini-batch's come from its own training forward (weights still unchanged),
        # which saves one forward pass over a quarter of the step.
        # Later mini-batches are packed exactly as their training forward will be, so under
        # bf16 the ratio starts at exactly 1 there too.
        old_batches = [batch for rows in (plans[0][1:] if plans else [])
                       for batch in micro_plan(rows)]
        task = bar.add_task("old log-probs", total=len(old_batches), info="") \
            if show_progress else None
        with torch.no_grad(), _autocast(device, autocast_dtype):
            for batch in old_batches:
                logp, entropy = forward_logprobs(model, batch, options.chunk_elements, True)
                for i, row in enumerate(batch.rows):
                    old[row] = logp[i][batch.response_mask[i]].float().cpu()
                entropy_sum += float(entropy.sum())
                entropy_count += entropy.numel()
                stats["tokens"] += batch.num_tokens
                if show_progress:
                    bar.update(task, advance=1)

        task = bar.add_task("updates", total=total_updates, info="") if show_progress else None
        tick = time.perf_counter()
        for epoch, plan in enumerate(plans):
            for index, rows in enumerate(plan):
                reuse = epoch == 0 and index == 0
                num_responses = len(rows)
                num_tokens = sum(len(data.response_tokens[r]) for r in rows)
                loss_total = 0.0
                for batch in micro_plan(rows):
                    with _autocast(device, autocast_dtype):
                        logp, entropy = forward_logprobs(model, batch, options.chunk_elements,
                                                         with_entropy=reuse)
                    mask = batch.response_mask
                    if reuse:  # weights untouched so far: these are the old log-probs
                        for i, row in enumerate(batch.rows):
                            old[row] = logp[i][mask[i]].detach().float().cpu()
                        entropy_sum += float(entropy.sum())
                        entropy_count += entropy.numel()
                    old_pad = torch.zeros(mask.shape, device=device)
                    old_pad[mask] = torch.cat([old[r] for r in batch.rows]).to(device)
                    adv = _rows_tensor(advantages, batch.rows, mask)
                    terms = algorithms.surrogate_loss(config, logp.float(), old_pad, adv, mask)
                    loss = algorithms.aggregate_loss(terms.per_token, mask, config.loss_agg,
                                                     num_responses, num_tokens, max_length)
                    loss.backward()
                    loss_total += float(loss.detach())
                    _tally(stats, batch, terms, logp.detach(), old_pad, epoch == len(plans) - 1)
                    stats["tokens"] += batch.num_tokens
                norm = torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
                if not torch.isfinite(norm):  # stop before NaN weights could be saved
                    raise DcpoError(f"step {data.step}: the gradient of update "
                                    f"{stats['updates'] + 1} is not finite; nothing was "
                                    "written (try a lower --lr)")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stats["grad_norms"].append(float(norm))
                stats["losses"].append(loss_total)
                stats["updates"] += 1
                if show_progress:
                    rate = stats["tokens"] / max(time.perf_counter() - tick, 1e-9)
                    bar.update(task, advance=1, info=f"{rate:,.0f} tok/s")
    stats["old"] = old
    if entropy_count:
        stats["entropy"] = entropy_sum / entropy_count
    return stats


def dr_grpo_length(data: StepData) -> int:
    """Dr. GRPO's constant normalizer: the rollouts' max_new_tokens, the same every step."""
    if not isinstance(data.max_new_tokens, int) or data.max_new_tokens < 1:
        raise DcpoError(f"{', '.join(sorted(set(data.files)))}: --loss-agg "
                        "seq-mean-token-sum-norm needs the rollouts' max_new_tokens, which the "
                        "metadata lacks (or the shards disagree on)")
    return data.max_new_tokens


def _pad_id(model) -> int:
    pad = model.config.pad_token_id
    if pad is None:
        pad = model.config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return int(pad or 0)


def _tally(stats: dict[str, Any], batch: MicroBatch, terms, logp: torch.Tensor,
           old_pad: torch.Tensor, last_epoch: bool) -> None:
    mask = batch.response_mask
    for key, count in algorithms.clip_counts(terms, mask).items():
        stats["clip_counts"][key] += count
    stats["kl_sum"] += algorithms.approx_kl_sum(logp.float(), old_pad, mask)
    if last_epoch:
        per_row_clipped = (terms.clipped & mask).sum(-1).tolist()
        counts = mask.sum(-1).clamp_min(1)
        means = ((logp.float() * mask).sum(-1) / counts).tolist()
        for i, row in enumerate(batch.rows):
            stats["row_clipped"][row] = int(per_row_clipped[i])
            stats["row_new"][row] = float(means[i])


def _metrics(data: StepData, advantages: list[float], stats: dict[str, Any], config,
             options: TrainOptions, lr: float, dropped: int, trained_groups: int
             ) -> dict[str, Any]:
    tokens = max(stats["clip_counts"]["tokens"], 1)
    lengths = [len(r) for r in data.response_tokens]
    norms = stats["grad_norms"]
    return {
        "algo": options.algo,
        **algorithms.clip_fractions(stats["clip_counts"]),
        "nonzero_advantage_ratio": algorithms.nonzero_advantage_ratio(advantages),
        "reward_mean": sum(data.rewards) / data.num_rows,
        "accuracy": sum(data.correct) / data.num_rows,
        "response_length_mean": sum(lengths) / data.num_rows,
        "response_length_max": max(lengths),
        "truncated_ratio": sum(data.truncated) / data.num_rows,
        "approx_kl": stats["kl_sum"] / tokens,
        "entropy": stats["entropy"] if math.isfinite(stats["entropy"]) else None,
        "grad_norm": sum(norms) / len(norms) if norms else 0.0,
        "grad_norm_max": max(norms) if norms else 0.0,
        "loss": sum(stats["losses"]) / len(stats["losses"]) if stats["losses"] else 0.0,
        "lr": lr,
        "updates": stats["updates"],
        "responses": data.num_rows,
        "prompts": trained_groups + dropped,
        "dropped_groups": dropped,
    }


def _records_table(data: StepData, advantages: list[float], stats: dict[str, Any]):
    """One row per response. Responses of dropped groups were not trained: their clipped
    count is 0 and their log-prob means are NaN. `new_logprob_mean` is the response's mean
    log-prob as the loss saw it in the last epoch (after the updates before its mini-batch)."""
    import pyarrow as pa

    old, nan = stats["old"], float("nan")
    columns = {
        "step": [data.step] * data.num_rows,
        "prompt_id": data.prompt_ids,
        "sample_index": data.sample_index,
        "reward": data.rewards,
        "advantage": advantages,
        "response_tokens": [len(r) for r in data.response_tokens],
        "clipped_tokens": [stats["row_clipped"].get(r, 0) for r in range(data.num_rows)],
        "old_logprob_mean": [float(old[r].mean()) if r in old else nan
                             for r in range(data.num_rows)],
        "new_logprob_mean": [stats["row_new"].get(r, nan) for r in range(data.num_rows)],
    }
    schema = pa.schema([(name, files.TRAIN_RECORD_COLUMNS[name]) for name in columns])
    return pa.table(columns, schema=schema)


def metrics_table(metrics: dict[str, Any], title: str):
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        value = metrics[key]
        if key == "checkpoint":
            continue
        if isinstance(value, float):
            text = f"{value:.3e}" if value and abs(value) < 1e-3 else f"{value:.4f}"
        else:
            text = str(value)
        table.add_row(key, text)
    return table
