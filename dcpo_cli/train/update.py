"""train-step passes over the model: the old log-probs, then the mini-batch updates.

`StepContext` is what both passes read (the model, the step's rows and advantages, the
resolved objective and options); `UpdateState` is what they measure and hand on to the
metrics and records. The math itself is `dcpo_cli.core.algorithms`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dcpo_cli.core import algorithms, mismatch
from dcpo_cli.core.algorithms import AlgoConfig
from dcpo_cli.core.batching import (
    MicroBatch,
    collate,
    default_mini_batch_size,
    micro_batches,
    mini_batches,
    shard,
    spread,
)
from dcpo_cli.core.logprobs import logprobs_of
from dcpo_cli.errors import DcpoError
from dcpo_cli.options import TrainOptions
from dcpo_cli.parallel import distributed
from dcpo_cli.train.inputs import StepData

Plans = list[list[list[int]]]  # per epoch, the mini-batches, each a list of rows


@dataclass
class StepContext:
    """What the old-log-prob pass and the update loop read; nothing here changes."""

    model: Any
    data: StepData
    config: AlgoConfig
    options: TrainOptions
    advantages: list[float]
    device: torch.device
    autocast_dtype: torch.dtype | None
    # Row -> the reference policy's log-probs (the KL loss; None when kl_coef is 0).
    ref: dict[int, torch.Tensor] | None = None
    # The training forward is random (LoRA dropout): it cannot stand in for the old one.
    stochastic: bool = False
    lengths: list[int] = field(init=False)  # prompt + response tokens of each row
    max_length: int | None = field(init=False)  # Dr. GRPO's constant normalizer, if used

    def __post_init__(self) -> None:
        self.max_length = dr_grpo_length(self.data) \
            if self.config.loss_agg == "seq-mean-token-sum-norm" else None
        self.lengths = [len(p) + len(r) for p, r in zip(self.data.prompt_tokens,
                                                        self.data.response_tokens, strict=True)]

    def micro_plan(self, rows: list[int]) -> list[MicroBatch]:
        """This rank's micro-batches of a mini-batch (all of them in one process). Under
        torchrun every rank runs the same number of forward/backward passes (FSDP2 gathers
        parameters in each): a rank with one micro-batch fewer adds a `dummy` one."""
        world = distributed.world()
        parts = spread(micro_batches(rows, self.lengths, self.options.micro_batch_tokens),
                       world.world_size)
        mine = shard(parts, world.rank, world.world_size)
        batches = [self._collate(part) for part in mine]
        turns = -(-len(parts) // world.world_size)
        batches += [dataclasses.replace(self._collate(parts[0]), dummy=True)
                    for _ in range(turns - len(batches))]
        return batches

    def _collate(self, rows: list[int]) -> MicroBatch:
        return collate(rows, self.data.prompt_tokens, self.data.response_tokens,
                       pad_id(self.model)).to(self.device)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


@dataclass
class UpdateState:
    """What the passes measured: the old log-probs, token counts, and the update statistics
    (per row: clipped tokens and the new mean log-prob, from the last epoch)."""

    old: dict[int, torch.Tensor] = field(default_factory=dict)  # row -> [response tokens]
    entropy_sum: float = 0.0
    entropy_count: int = 0
    tokens: int = 0
    updates: int = 0
    grad_norms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    clip_counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(algorithms.CLIP_COUNTS, 0))
    kl_sum: float = 0.0
    row_clipped: dict[int, int] = field(default_factory=dict)
    row_new: dict[int, float] = field(default_factory=dict)

    @property
    def entropy(self) -> float:
        """Mean policy entropy at the trained response tokens before any update."""
        return self.entropy_sum / self.entropy_count if self.entropy_count else float("nan")

    def keep_old(self, batch: MicroBatch, logp: torch.Tensor, entropy: torch.Tensor) -> None:
        """Record a micro-batch's log-probs under the weights before any update."""
        for i, row in enumerate(batch.rows):
            self.old[row] = logp[i][batch.response_mask[i]].detach().float().cpu()
        self.entropy_sum += float(entropy.sum())
        self.entropy_count += entropy.numel()

    def tally(self, batch: MicroBatch, terms, logp: torch.Tensor, old_pad: torch.Tensor,
              last_epoch: bool) -> None:
        mask = batch.response_mask
        for key, count in algorithms.clip_counts(terms, mask).items():
            self.clip_counts[key] += count
        self.kl_sum += algorithms.approx_kl_sum(logp.float(), old_pad, mask)
        if last_epoch:
            per_row_clipped = (terms.clipped & mask).sum(-1).tolist()
            counts = mask.sum(-1).clamp_min(1)
            means = ((logp.float() * mask).sum(-1) / counts).tolist()
            for i, row in enumerate(batch.rows):
                self.row_clipped[row] = int(per_row_clipped[i])
                self.row_new[row] = float(means[i])


class Ticker:
    """A progress bar's task, or nothing when progress is off."""

    def __init__(self, bar, name: str, total: int) -> None:
        self.bar = bar
        self.task = bar.add_task(name, total=total, info="") if bar is not None else None

    def advance(self, info: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, **({} if info is None else {"info": info}))


def plan_updates(ctx: StepContext, groups: list[list[int]]) -> Plans:
    """Each epoch's mini-batches of groups, shuffled by (seed, step, epoch)."""
    options = ctx.options
    size = options.mini_batch_size or default_mini_batch_size(len(groups))
    plans = [mini_batches(groups, size, options.seed, ctx.data.step, epoch)
             for epoch in range(options.epochs)] if groups else []
    check_world_size(ctx.data, plans, distributed.world().world_size)
    return plans


def check_world_size(data: StepData, plans: Plans, world_size: int) -> None:
    """Every process needs at least one response of every mini-batch (a process with none
    would only run zero-weighted passes to keep FSDP2's collectives in step): refuse a world
    larger than the smallest mini-batch, before anything is loaded or written."""
    smallest = min((len(rows) for plan in plans for rows in plan), default=world_size)
    if smallest < world_size:
        raise DcpoError(f"{', '.join(sorted(set(data.files)))}: a mini-batch of {smallest} "
                        f"responses cannot be split across {world_size} processes (each needs "
                        "at least one response per update); use fewer processes or a larger "
                        "--mini-batch-size")


def forward_logprobs(model, batch: MicroBatch, chunk_elements: int, with_entropy: bool = False,
                     temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`logprobs_of` the policy; under torchrun `model` is the FSDP2 root (`fsdp.Scorer`),
    whose forward runs the same function with its parameters gathered."""
    if not hasattr(model, "base_model_prefix"):  # the Scorer wrapping the policy
        return model(batch, chunk_elements, with_entropy, temperature)
    return logprobs_of(model, batch, chunk_elements, with_entropy, temperature)


def old_logprobs(ctx: StepContext, plans: Plans, state: UpdateState, bar=None) -> None:
    """Old log-probs of every trained response with the weights before any update.

    The first mini-batch's come from its own training forward (weights still unchanged),
    which saves one forward pass over a quarter of the step; see `run_updates`. The others
    are packed exactly as their training forward will be, so under bf16 the ratio starts at
    exactly 1 there too."""
    later = (plans[0] if ctx.stochastic else plans[0][1:]) if plans else []
    batches = [batch for rows in later for batch in ctx.micro_plan(rows)]
    ticker = Ticker(bar, "old log-probs", len(batches))
    with torch.no_grad(), ctx.autocast():
        for batch in batches:
            logp, entropy = forward_logprobs(ctx.model, batch, ctx.options.chunk_elements, True,
                                             ctx.data.temperature)
            if batch.dummy:
                continue
            state.keep_old(batch, logp, entropy)
            state.tokens += batch.num_tokens
            ticker.advance()


def run_updates(ctx: StepContext, optimizer, plans: Plans, state: UpdateState, bar=None
                ) -> None:
    """`epochs` passes of mini-batch updates: one optimizer step per mini-batch."""
    data, options, config = ctx.data, ctx.options, ctx.config
    # The optimizer's: under FSDP2 the root's parameters stay gathered after a no-grad
    # forward, so the module may list its unsharded tensors here instead of the shards.
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    ticker = Ticker(bar, "updates", sum(len(p) for p in plans))
    tick = time.perf_counter()
    for epoch, plan in enumerate(plans):
        for index, rows in enumerate(plan):
            reuse = epoch == 0 and index == 0 and not ctx.stochastic
            num_responses = len(rows)
            num_tokens = sum(len(data.response_tokens[r]) for r in rows)
            loss_total = 0.0
            for batch in ctx.micro_plan(rows):
                if batch.dummy:  # no rows left on this rank: keep FSDP2's passes in step
                    _zero_weighted_pass(ctx, batch)
                    continue
                with ctx.autocast():
                    logp, entropy = forward_logprobs(ctx.model, batch, options.chunk_elements,
                                                     reuse, ctx.data.temperature)
                mask = batch.response_mask
                if reuse:  # weights untouched so far: these are the old log-probs
                    state.keep_old(batch, logp, entropy)
                old_pad = torch.zeros(mask.shape, device=ctx.device)
                old_pad[mask] = torch.cat([state.old[r] for r in batch.rows]).to(ctx.device)
                adv = _rows_tensor(ctx.advantages, batch.rows, mask)
                terms = algorithms.surrogate_loss(config, logp.float(), old_pad, adv, mask)
                per_token = rollout_corrected(ctx, batch, terms.per_token, old_pad)
                loss = algorithms.aggregate_loss(per_token, mask, config.loss_agg,
                                                 num_responses, num_tokens, ctx.max_length)
                loss = loss + kl_loss(ctx, batch, logp.float(), num_responses, num_tokens)
                loss.backward()
                loss_total += float(loss.detach())
                state.tally(batch, terms, logp.detach(), old_pad, epoch == len(plans) - 1)
                state.tokens += batch.num_tokens
            distributed.die_here_for_tests(state.updates + 1)
            norm = clip_grad_norm(params, options.max_grad_norm)
            if not torch.isfinite(norm):  # stop before NaN weights could be saved
                raise DcpoError(f"step {data.step}: the gradient of update "
                                f"{state.updates + 1} is not finite; nothing was "
                                "written (try a lower --lr)")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.grad_norms.append(float(norm))
            state.losses.append(loss_total)
            state.updates += 1
            rate = state.tokens / max(time.perf_counter() - tick, 1e-9)
            ticker.advance(f"{rate:,.0f} tok/s")


def rows_padded(values: dict[int, torch.Tensor] | list[list[float]], batch: MicroBatch
                ) -> torch.Tensor:
    """Per-row response values (a tensor or list per row) laid out [B, Lmax], 0 on padding."""
    mask = batch.response_mask
    flat = torch.cat([torch.as_tensor(values[r], dtype=torch.float32) for r in batch.rows])
    padded = torch.zeros(mask.shape, device=mask.device)
    padded[mask] = flat.to(mask.device)
    return padded


def rollout_corrected(ctx: StepContext, batch: MicroBatch, per_token: torch.Tensor,
                      old_pad: torch.Tensor) -> torch.Tensor:
    """Each token's loss times its rollout-correction weight (--rollout-correction tis:
    min(pi_old / pi_sampler, C); mask: the ratio, or 0 beyond C), as verl multiplies the
    policy-gradient loss by its rollout IS weights before aggregating. `none`: unchanged."""
    mode = ctx.options.rollout_correction
    if mode == "none":
        return per_token
    sampler = rows_padded(ctx.data.sampler_logprobs, batch)
    weights = mismatch.correction_weights(old_pad, sampler, batch.response_mask, mode,
                                          ctx.options.rollout_correction_cap)
    return per_token * weights


def kl_loss(ctx: StepContext, batch: MicroBatch, logp: torch.Tensor, num_responses: int,
            num_tokens: int) -> torch.Tensor | float:
    """kl_coef times the per-token KL estimate to the reference, aggregated like the policy
    loss (verl's use_kl_loss); 0 when kl_coef is 0."""
    config = ctx.config
    if not config.kl_coef:
        return 0.0
    if ctx.ref is None:
        raise RuntimeError("kl_coef > 0 needs the reference log-probs (StepContext.ref)")
    mask = batch.response_mask
    kl = algorithms.kl_penalty(logp, rows_padded(ctx.ref, batch), config.kl_type)
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    return config.kl_coef * algorithms.aggregate_loss(kl, mask, config.loss_agg, num_responses,
                                                      num_tokens, ctx.max_length)


def clip_grad_norm(params: list, max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` on the global gradient norm. One process: torch's own. Under FSDP2
    each rank holds a shard of every gradient (DTensor): the squares of the local shards
    are summed over ranks here (in float64), which counts every element once."""
    if not distributed.world().sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    shards = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
              for p in params if p.grad is not None]
    local = sum(float(g.detach().double().pow(2).sum()) for g in shards)
    norm = torch.tensor(distributed.all_reduce_sum([local])[0] ** 0.5)
    scale = min(1.0, max_norm / (float(norm) + 1e-6))  # as torch's clip_grad_norm_
    if scale < 1.0 and torch.isfinite(norm):
        for g in shards:
            g.mul_(scale)
    return norm


def _zero_weighted_pass(ctx: StepContext, batch: MicroBatch) -> None:
    with ctx.autocast():
        logp, _ = forward_logprobs(ctx.model, batch, ctx.options.chunk_elements)
    (logp.float().sum() * 0.0).backward()


def reduce_across_ranks(state: UpdateState) -> None:
    """Under torchrun: sum every rank's statistics (the same on every rank afterwards) and
    gather the per-row ones (old log-probs, clipped counts, new means) on rank 0, which
    writes the records. Gradient norms are already global (clip_grad_norm_ on DTensors)."""
    world = distributed.world()
    if not world.sharded:
        return
    keys = list(state.clip_counts)
    sums = distributed.all_reduce_sum([state.entropy_sum, state.entropy_count, state.tokens,
                                       state.kl_sum, *(state.clip_counts[k] for k in keys),
                                       *state.losses])
    state.entropy_sum, state.kl_sum = sums[0], sums[3]
    state.entropy_count, state.tokens = int(sums[1]), int(sums[2])
    state.clip_counts = {k: int(v) for k, v in zip(keys, sums[4:4 + len(keys)], strict=True)}
    state.losses = sums[4 + len(keys):]
    parts = distributed.gather_object((state.old, state.row_clipped, state.row_new))
    if parts is not None:
        for old, clipped, new in parts:
            state.old.update(old)
            state.row_clipped.update(clipped)
            state.row_new.update(new)


def dr_grpo_length(data: StepData) -> int:
    """Dr. GRPO's constant normalizer: the rollouts' max_new_tokens, the same every step."""
    if not isinstance(data.max_new_tokens, int) or data.max_new_tokens < 1:
        raise DcpoError(f"{', '.join(sorted(set(data.files)))}: --loss-agg "
                        "seq-mean-token-sum-norm needs the rollouts' max_new_tokens, which the "
                        "metadata lacks (or the shards disagree on)")
    return data.max_new_tokens


def pad_id(model) -> int:
    pad = model.config.pad_token_id
    if pad is None:
        pad = model.config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return int(pad or 0)


def _rows_tensor(values: list[float], rows: list[int], mask: torch.Tensor) -> torch.Tensor:
    return torch.tensor([values[r] for r in rows], dtype=torch.float32,
                        device=mask.device)[:, None].expand(mask.shape)
