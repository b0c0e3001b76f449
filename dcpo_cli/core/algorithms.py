"""DCPO and its baselines as pure tensor math (docs/design.md section 1). No file or model I/O.

Shapes: per-token tensors are [B, L] with a boolean `mask` marking response tokens;
per-response tensors are [B]; a group's rewards are [G].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dcpo_cli.core.presets import (  # noqa: F401  (re-exported: one objective, its presets)
    ADVANTAGES,
    CLIP_MODES,
    KL_TYPES,
    LOSS_AGGS,
    PRESETS,
    AlgoConfig,
    resolve_config,
    validate_config,
)
from dcpo_cli.errors import DcpoError

GRPO_STD_EPS = 1e-6
# exp() of a log-ratio beyond this is meaningless and would overflow in fp32.
LOG_RATIO_LIMIT = 20.0


# ---------------------------------------------------------------- clipping bounds


def dac_bounds(old_logprobs: torch.Tensor, eps_low: float, eps_high: float,
               ratio_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ratio bounds of dynamic-adaptive clipping, from |(r - 1) p| <= eps, p = r q.

    low(q)  = 0.5 + 0.5 sqrt(max(1 - 4 eps_low / q, 0))
    high(q) = min(0.5 + 0.5 sqrt(1 + 4 eps_high / q), ratio_max)
    """
    q = old_logprobs.exp()
    low = 0.5 + 0.5 * torch.sqrt(torch.clamp(1 - 4 * eps_low / q, min=0.0))
    high = torch.clamp(0.5 + 0.5 * torch.sqrt(1 + 4 * eps_high / q), max=ratio_max)
    return low, high


def ratio_bounds(config: AlgoConfig, old_logprobs: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) per token for the configured clipping (fixed and sequence: constants)."""
    if config.clip == "dac":
        return dac_bounds(old_logprobs, config.eps_low, config.eps_high, config.ratio_max)
    low = torch.full_like(old_logprobs, 1.0 - config.eps_low)
    high = torch.full_like(old_logprobs, 1.0 + config.eps_high)
    return low, high


# ---------------------------------------------------------------- ratios


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return (values * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def token_ratios(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    return torch.exp(torch.clamp(logprobs - old_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))


def sequence_ratios(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
                    ) -> torch.Tensor:
    """GSPO: s = exp(mean_t(logp - old)) for each response, written per token as
    exp(sg[log s] + logp - sg[logp]) so the value is s and the gradient flows through each
    token's logp with weight s (GSPO-token form; same gradient as the sequence form)."""
    log_s = masked_mean(logprobs - old_logprobs, mask).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.exp(log_s.detach()[:, None] + logprobs - logprobs.detach())


def policy_ratios(config: AlgoConfig, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
    if config.clip == "sequence":
        return sequence_ratios(logprobs, old_logprobs, mask)
    return token_ratios(logprobs, old_logprobs)


# ---------------------------------------------------------------- surrogate loss


class LossTerms(NamedTuple):
    per_token: torch.Tensor  # [B, L] loss of each token, 0 on padding
    clipped: torch.Tensor  # [B, L] bool: the clipped branch was taken (l2 > l1)
    clipped_low: torch.Tensor  # clipped with A < 0 (ratio below the lower bound)
    clipped_high: torch.Tensor  # clipped with A > 0 (ratio above the upper bound)
    dual_clipped: torch.Tensor  # A < 0 and the loss was capped at -A c (not in `clipped`)
    ratio: torch.Tensor  # [B, L] the ratio the loss used


def surrogate_loss(config: AlgoConfig, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                   advantages: torch.Tensor, mask: torch.Tensor) -> LossTerms:
    """Per-token clipped surrogate (docs/design.md 1.1):

    l1 = -A r, l2 = -A clip(r, low, high), l = max(l1, l2), and for A < 0 with dual
    clipping l = min(l, -A c). `advantages` is [B] (one per response) or [B, L].
    """
    mask = mask.bool()
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(mask.shape)
    advantages = advantages.to(logprobs.dtype)
    ratio = policy_ratios(config, logprobs, old_logprobs, mask)
    low, high = ratio_bounds(config, old_logprobs)
    l1 = -advantages * ratio
    l2 = -advantages * torch.minimum(torch.maximum(ratio, low), high)
    clipped = (l2 > l1) & mask
    loss = torch.maximum(l1, l2)
    dual_clipped = torch.zeros_like(mask)
    if config.dual_clip is not None:
        cap = -advantages * config.dual_clip
        dual_clipped = (advantages < 0) & (loss > cap) & mask
        loss = torch.where(advantages < 0, torch.minimum(loss, cap), loss)
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    return LossTerms(loss, clipped, clipped & (advantages < 0), clipped & (advantages > 0),
                     dual_clipped, ratio)


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str,
                   num_responses: int, num_tokens: int, max_length: int | None = None
                   ) -> torch.Tensor:
    """This micro-batch's share of the mini-batch loss.

    The normalizers describe the whole mini-batch (`num_responses` responses holding
    `num_tokens` response tokens), so summing the shares of any split of the mini-batch
    gives the same loss, and the same gradient, as one pass over all of it.

    - otm (DCPO, the paper's formula): (1/N) sum_j sum_t l_jt. No length normalization:
      every token of response j weighs A_j whatever the response's length (docs: OTM).
      verl calls the same formula `seq-mean-token-sum`, kept as an alias.
    - seq-mean-token-mean (GRPO): (1/N) sum_j mean_t l_jt; a long response's tokens weigh
      less than a short one's.
    - token-mean (DAPO): sum of all token losses / all tokens of the mini-batch.
    - seq-mean-token-sum-norm (Dr. GRPO): sum of all token losses / (N * max_length).
    """
    mask = mask.to(per_token.dtype)
    masked = per_token * mask
    if loss_agg in ("otm", "seq-mean-token-sum"):
        return masked.sum() / num_responses
    if loss_agg == "seq-mean-token-mean":
        per_response = masked.sum(-1) / mask.sum(-1).clamp_min(1)
        return per_response.sum() / num_responses
    if loss_agg == "token-mean":
        return masked.sum() / max(num_tokens, 1)
    if loss_agg == "seq-mean-token-sum-norm":
        if not max_length:
            raise ValueError("seq-mean-token-sum-norm needs max_length")
        return masked.sum() / (num_responses * max_length)
    raise ValueError(f"unknown loss aggregation {loss_agg!r}")


# ---------------------------------------------------------------- KL to the reference policy


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str
               ) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman's k1, k2,
    k3), as the official GRPO/GSPO runs add it to the loss (docs: KL).

    - k1: logp - ref_logp (unbiased, high variance, can be negative);
    - k2: (logp - ref_logp)^2 / 2;
    - low_var_kl (k3): exp(ref - logp) - (ref - logp) - 1, never negative; its log-ratio is
      clamped to [-20, 20] and the result to at most 10, as verl does, so one token far off
      the reference cannot dominate the step.
    """
    if kl_type == "k1":
        return logprobs - ref_logprobs
    if kl_type == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if kl_type == "low_var_kl":
        log_ratio = torch.clamp(ref_logprobs - logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        return torch.clamp(torch.exp(log_ratio) - log_ratio - 1, max=10.0)
    raise ValueError(f"unknown KL type {kl_type!r}; choose one of {', '.join(KL_TYPES)}")


# ---------------------------------------------------------------- advantages


def grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(R - mean) / (std + 1e-6) over one group, std with Bessel's correction."""
    if rewards.numel() < 2:
        raise DcpoError("group advantages need at least 2 responses per prompt")
    if bool((rewards == rewards[0]).all()):
        # Exactly 0: the mean of equal fractional rewards can differ from them by a rounding
        # residue, which /1e-6 would turn into a nonzero advantage.
        return torch.zeros_like(rewards)
    return (rewards - rewards.mean()) / (rewards.std(unbiased=True) + GRPO_STD_EPS)


@dataclass(frozen=True)
class PromptStats:
    """Cumulative reward statistics of one prompt across the steps it was trained on."""

    times: int
    mean: float
    std: float


def _standardize(rewards: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    if std > 0:
        return (rewards - mean) / std
    return torch.zeros_like(rewards)


def sas_advantages(rewards: torch.Tensor, stats: PromptStats | None
                   ) -> tuple[torch.Tensor, PromptStats]:
    """Smooth advantage standardization of one group (docs/design.md 1.2, the official rule).

    `stats` is the prompt's state before this step (None on the first visit). Returns the
    advantages, in the rewards' dtype (use float64), and the prompt's new state.
    """
    if rewards.numel() < 2:
        raise DcpoError("smooth advantages need at least 2 responses per prompt")
    mean_new = float(rewards.mean())
    # An all-equal group has std exactly 0; computing it could leave a rounding residue.
    std_new = 0.0 if bool((rewards == rewards[0]).all()) else float(rewards.std(unbiased=True))
    times = stats.times if stats else 0
    t = times + 1
    if times == 0:
        mean_tot, std_tot = mean_new, std_new
    else:
        mean_tot = (stats.mean * times + mean_new) / t
        var_tot = (times * stats.std ** 2 + std_new ** 2
                   + times / t * (mean_new - stats.mean) ** 2) / t
        std_tot = math.sqrt(var_tot)
    a_new = _standardize(rewards, mean_new, std_new)
    a_total = _standardize(rewards, mean_tot, std_tot)
    sa_new = (t - 1) / t * a_new + a_total / t
    sa_total = a_new / t + (t - 1) / t * a_total
    advantages = torch.where(sa_new.abs() < sa_total.abs(), sa_new, sa_total)
    return advantages, PromptStats(times=t, mean=mean_tot, std=std_tot)


def group_advantages(estimator: str, rewards: torch.Tensor, stats: PromptStats | None
                     ) -> tuple[torch.Tensor, PromptStats]:
    """The one dispatch point of the advantage estimators (`AlgoConfig.advantage`): one
    group's advantages, and the prompt's SAS statistics after this step. The statistics
    absorb the rewards whatever the estimator, so a later switch to SAS finds the history
    complete."""
    advantages, new_stats = sas_advantages(rewards, stats)
    if estimator == "grpo":
        advantages = grpo_advantages(rewards)
    elif estimator != "sas":
        raise ValueError(f"unknown advantage estimator {estimator!r}")
    return advantages, new_stats


# ---------------------------------------------------------------- metrics (docs/design.md 1.7)


CLIP_COUNTS = ("clipped", "clipped_low", "clipped_high", "dual_clipped", "tokens")


def clip_counts(terms: LossTerms, mask: torch.Tensor) -> dict[str, int]:
    """Clipped response tokens (both sides, each side, dual-clipped) and all response tokens
    of one micro-batch: counts, so they add up across micro-batches."""
    return {
        "clipped": int((terms.clipped & mask).sum()),
        "clipped_low": int((terms.clipped_low & mask).sum()),
        "clipped_high": int((terms.clipped_high & mask).sum()),
        "dual_clipped": int((terms.dual_clipped & mask).sum()),
        "tokens": int(mask.sum()),
    }


def clip_fractions(counts: dict[str, int]) -> dict[str, float]:
    """Token clipping ratio, split by side, and the dual-clipped fraction."""
    total = max(counts["tokens"], 1)
    return {
        "clip_ratio": counts["clipped"] / total,
        "clip_ratio_low": counts["clipped_low"] / total,
        "clip_ratio_high": counts["clipped_high"] / total,
        "dual_clip_ratio": counts["dual_clipped"] / total,
    }


def nonzero_advantage_ratio(advantages: list[float]) -> float:
    """Response utilization ratio: the fraction of responses whose advantage is not 0."""
    if not advantages:
        return 0.0
    return sum(a != 0 for a in advantages) / len(advantages)


def approx_kl_sum(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
                  ) -> float:
    """Sum over response tokens of old_logp - new_logp; divided by the token count it is
    the approximate KL(old || new) of docs/design.md 1.7."""
    return float(((old_logprobs - logprobs) * mask).sum())
