"""Token log-probabilities and entropy without a [tokens x vocab] fp32 log-softmax.

Real policies have ~150k-token vocabularies: a full fp32 log-softmax over a micro-batch of
8k tokens is 4.9 GB. Instead the lm-head is applied to a few tokens at a time; each chunk
gives the chosen token's logit minus a logsumexp over the vocabulary, and under autograd the
chunk is recomputed in backward (activation checkpointing), so at most one chunk's logits
are alive at any moment, forward or backward.

`temperature` T gives the log-probs of softmax(logits / T), the distribution a rollout at
temperature T sampled from (its `response_logprobs`). The division is on the logits, after
the lm-head's bias; T == 1 skips it, so the numbers are bit-identical to no temperature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dcpo_cli.options import CHUNK_ELEMENTS  # 2^24 fp32 logits = 64 MiB (~110 tokens at 150k)

if TYPE_CHECKING:
    from dcpo_cli.core.batching import MicroBatch


def _rows_per_chunk(vocab: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(vocab, 1))


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            temperature: float) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return logits if temperature == 1.0 else logits / temperature


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logits = _logits(hidden, weight, bias, temperature)
    chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   bias: torch.Tensor | None = None,
                   chunk_elements: int = CHUNK_ELEMENTS, temperature: float = 1.0
                   ) -> torch.Tensor:
    """log softmax((hidden @ weight.T + bias) / temperature)[i, targets[i]] for hidden
    [N, H], targets [N].

    Differentiable with respect to `hidden`, `weight` and `bias`; returns fp32 [N].
    """
    rows = _rows_per_chunk(weight.shape[0], chunk_elements)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    pieces = []
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start:start + rows], targets[start:start + rows]
        if needs_grad:  # keep only the chunk's inputs; its logits are rebuilt in backward
            pieces.append(checkpoint(_chunk_logprobs, h, weight, bias, y, temperature,
                                     use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, weight, bias, y, temperature))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


@torch.no_grad()
def token_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  chunk_elements: int = CHUNK_ELEMENTS, temperature: float = 1.0
                  ) -> torch.Tensor:
    """Entropy (nats) of softmax((hidden @ weight.T + bias) / temperature) for each row of
    hidden [N, H]."""
    rows = _rows_per_chunk(weight.shape[0], chunk_elements)
    pieces = []
    for start in range(0, hidden.shape[0], rows):
        logits = _logits(hidden[start:start + rows], weight, bias, temperature)
        logz = torch.logsumexp(logits, dim=-1)
        probs = torch.softmax(logits, dim=-1)
        pieces.append(logz - (probs * logits).sum(-1))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def lm_head_of(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's weight and bias (tied or not)."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def decoder_of(model):
    """The transformer body that returns hidden states (e.g. `model.model` for Qwen2)."""
    return getattr(model, model.base_model_prefix)


def check_plain_lm_head(model) -> None:
    """The chunked path applies the lm-head itself, so models that post-process logits
    (soft-capping, scaling) are refused rather than silently mis-scored."""
    from dcpo_cli.errors import DcpoError

    config = model.config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise DcpoError(f"model config sets {name}={value}; train-step supports plain "
                            "linear lm-heads only")


def logprobs_of(model, batch: MicroBatch, chunk_elements: int, with_entropy: bool = False,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Response-token log-probs laid out [B, Lmax] (0 on padding), and optionally the
    policy's entropy at each response token (flat, no grad). The lm-head is applied only at
    positions that predict response tokens, chunk by chunk (above); `temperature`
    is the rollouts' (the distribution they sampled from)."""
    hidden = decoder_of(model)(input_ids=batch.input_ids,
                               attention_mask=batch.attention_mask).last_hidden_state
    picked = hidden[batch.predict_mask]
    weight, bias = lm_head_of(model)
    flat = token_logprobs(picked, weight, batch.targets, bias, chunk_elements, temperature)
    entropy = None
    if with_entropy:
        entropy = token_entropy(picked.detach(), weight.detach(),
                                None if bias is None else bias.detach(), chunk_elements,
                                temperature)
    padded = flat.new_zeros(batch.response_mask.shape).masked_scatter(batch.response_mask, flat)
    return padded, entropy
