"""The KL loss's reference policy: which model it is, and its log-probs for one step.

The reference is the run's first model unless `--ref-model` names another; the first step
that uses it records it in the checkpoint's trainer state (`ref_model`,
`ref_model_revision`), and later steps read it from there, so every step of a run measures
the KL to the same weights. It is loaded only when kl_coef > 0, in eval mode, once per step:
its log-probs of every trained response are computed (no grad, chunked through the lm-head
like the old log-probs, at the rollouts' temperature as verl does, packed exactly as the
training forward will be) and the model is freed before the updates. Under torchrun it is
sharded with FSDP2 like the policy, so no rank holds a whole second model.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import torch

from dcpo_cli.core.logprobs import check_plain_lm_head
from dcpo_cli.errors import DcpoError
from dcpo_cli.files.checkpoint import is_checkpoint, read_trainer_state
from dcpo_cli.files.model_source import ModelSource, resolve_model
from dcpo_cli.parallel import distributed
from dcpo_cli.policy.build import build_policy, vocab_size


@dataclass(frozen=True)
class Reference:
    """The reference as recorded: a Hub id and commit, or an absolute directory."""

    name: str
    revision: str | None

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name

    def record(self) -> dict[str, str | None]:
        return {"ref_model": self.name, "ref_model_revision": self.revision}


def recorded_reference(model_dir: Path) -> Reference | None:
    """The reference a checkpoint's run has used, if it recorded one."""
    trainer = read_trainer_state(model_dir) if is_checkpoint(model_dir) else None
    if not trainer or not trainer.get("ref_model"):
        return None
    return Reference(trainer["ref_model"], trainer.get("ref_model_revision"))


def choose_reference(given: str | None, model_dir: Path, base: Reference,
                     policy_source: ModelSource) -> tuple[Reference, ModelSource]:
    """The reference to use this step and where its files are (resolved: a Hub id may be
    fetched). `given` is --ref-model; `base` the run's first model; `policy_source` the
    policy this step starts from (reused when it is the reference, as at a run's start)."""
    recorded = recorded_reference(model_dir)
    spec = given or (recorded or base).spec
    if given is None and Reference(policy_source.name, policy_source.commit) == (recorded or base):
        source = policy_source
    else:
        source = resolve_model(spec)
    chosen = Reference(source.name, source.commit)
    if recorded is not None and chosen != recorded:
        raise DcpoError(f"--ref-model {given}: this run's KL reference is {recorded.spec} "
                        f"(recorded in {Path(model_dir) / 'trainer_state.json'}); every step "
                        "must use the same one")
    return chosen, source


def load_reference(source: ModelSource, device: torch.device, policy_vocab: int,
                   cpu_offload: bool = False):
    """The reference model in eval mode without gradients (under torchrun: its FSDP2 root,
    sharded as the policy is); its vocabulary must be the policy's (the same token ids
    must mean the same tokens)."""
    model, _ = build_policy(source.path, torch.device("cpu") if cpu_offload else device)
    check_plain_lm_head(model)
    vocab = vocab_size(model)
    if vocab != policy_vocab or model.get_output_embeddings().weight.shape[0] != policy_vocab:
        raise DcpoError(f"{source.spec}: the reference model's vocabulary ({vocab} tokens) "
                        f"differs from the policy's ({policy_vocab}); give a --ref-model with "
                        "the policy's tokenizer")
    model.eval()
    model.requires_grad_(False)
    if distributed.world().sharded:
        from dcpo_cli.parallel.fsdp import shard_policy

        return shard_policy(model, cpu_offload)
    return model


def reference_logprobs(model, ctx, rows_per_batch: list[list[int]], bar=None
                       ) -> dict[int, torch.Tensor]:
    """Row -> the reference's log-probs of its response tokens (fp32, CPU), from a loaded
    reference `model`, packed as `ctx.micro_plan` packs the training forward."""
    from dcpo_cli.train.update import Ticker, forward_logprobs

    batches = [batch for rows in rows_per_batch for batch in ctx.micro_plan(rows)]
    ticker = Ticker(bar, "reference log-probs", len(batches))
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad(), ctx.autocast():
        for batch in batches:
            logp, _ = forward_logprobs(model, batch, ctx.options.chunk_elements,
                                       temperature=ctx.data.temperature)
            if batch.dummy:  # a rank's filler pass (no rows of its own) keeps FSDP2 in step
                continue
            for i, row in enumerate(batch.rows):
                out[row] = logp[i][batch.response_mask[i]].float().cpu()
            ticker.advance()
    return out


def step_reference_logprobs(source: ModelSource, ctx, plans, policy_vocab: int, bar=None
                            ) -> dict[int, torch.Tensor]:
    """Load the reference, compute the log-probs of the step's trained rows, free it."""
    model = load_reference(source, ctx.device, policy_vocab, ctx.options.cpu_offload)
    try:
        return reference_logprobs(model, ctx, plans[0] if plans else [], bar)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def base_logprobs(model, ctx, plans, bar=None) -> dict[int, torch.Tensor]:
    """With LoRA: the reference is the base model, which is the policy with its adapter
    disabled (peft's `disable_adapter`): no second copy of the weights is loaded."""
    from dcpo_cli.policy import lora

    with lora.adapter_disabled(model):
        return reference_logprobs(ctx.model, ctx, plans[0] if plans else [], bar)


def kl_ref(old: dict[int, torch.Tensor], ref: dict[int, torch.Tensor], kl_type: str
           ) -> float | None:
    """The metric `kl_ref`: the mean over the step's trained tokens of the `kl_type`
    estimate of KL(policy || reference), for the policy at the start of the step (the one
    that sampled the rollouts; its old log-probs). 0 at a run's first step."""
    from dcpo_cli.core import algorithms

    rows = [r for r in old if r in ref]
    if not rows:
        return None
    values = algorithms.kl_penalty(torch.cat([old[r] for r in rows]),
                                   torch.cat([ref[r] for r in rows]), kl_type)
    return float(values.mean())

