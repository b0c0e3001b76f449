"""The sampler–trainer mismatch as pure tensor math: how far the rollout engine's log-probs
(`response_logprobs`, pi_sampler) are from the trainer's old log-probs (pi_old) on the same
tokens, and the importance weights that correct for it.

Shapes follow algorithms.py: per-token tensors are [B, L] with a boolean `mask` marking
response tokens. With log-ratio d = log pi_old - log pi_sampler and ratio rho = exp(d):

- `mismatch_kl`: the k3 estimator rho - 1 - d, averaged over tokens; since the tokens were
  drawn from pi_sampler it estimates KL(pi_sampler || pi_old) (verl's `k3_kl`, prime-rl's
  `mismatch_kl`). Always >= 0, and 0 only where the two agree.
- `mismatch_logprob_diff`: the mean of |d| (TRL's `sampling_logp_difference/mean`).
- `mismatch_outside_ratio`: the fraction of tokens whose rho lies outside [0.5, 2].

Corrections (each token's loss is multiplied by its weight, a constant: no gradient flows
through it; padding gets 0):

- `tis`, truncated importance sampling: w = min(rho, C) (TRL `token_truncate`, verl
  `rollout_is: token` with `rollout_is_threshold: C`).
- `mask`, masked importance sampling: w = rho where rho <= C, else 0, so the tokens beyond
  the cap drop out of the gradient (TRL `token_mask` with only an upper bound).

Stale rollouts (train-step --max-staleness K, sampled by the policy of an earlier step) are
the same correction with a larger gap: pi_old stays the trainer's own log-probs of the
current policy, the clip bounds come from it, and w corrects from pi_sampler to pi_old (the
decoupled PPO objective of AReaL, verl's rollout correction). `auto` (`resolve_correction`)
is none on policy and tis on stale rollouts; docs/design.md gives the formula and sources.
"""

from __future__ import annotations

import torch

from dcpo_cli.options import AUTO_CORRECTION
from dcpo_cli.options import ROLLOUT_CORRECTIONS as CORRECTIONS  # ("none", "tis", "mask")

OUTSIDE_BOUNDS = (0.5, 2.0)
# exp() of a log-ratio beyond this overflows or underflows fp32 (verl clamps the same way).
LOG_RATIO_LIMIT = 20.0
MISMATCH_KEYS = ("mismatch_kl", "mismatch_logprob_diff", "mismatch_outside_ratio")


# What "auto" becomes on rollouts of an older policy: verl's rollout correction default
# (token-level truncated IS, threshold 2.0) and the TIS of Yao et al. 2025.
STALE_CORRECTION = "tis"


def resolve_correction(mode: str, staleness: int | None) -> str:
    """The correction a step applies: `mode` itself, except "auto", which is "none" on policy
    (staleness 0, or unknown: files that do not record their sampling policy, trained as
    before) and STALE_CORRECTION on rollouts `staleness` >= 1 steps old."""
    if mode != AUTO_CORRECTION:
        return mode
    return STALE_CORRECTION if staleness else "none"


def log_ratio(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """log pi_old - log pi_sampler, clamped to +-LOG_RATIO_LIMIT, 0 on padding (fp32)."""
    mask = mask.bool()
    diff = trainer_logprobs.float() - sampler_logprobs.float()
    diff = diff.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    return torch.where(mask, diff, torch.zeros_like(diff))


def mismatch_sums(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                  mask: torch.Tensor) -> dict[str, float]:
    """Sums over the response tokens of one micro-batch; add them up across micro-batches and
    turn them into metrics with `mismatch_metrics`."""
    mask = mask.bool()
    with torch.no_grad():
        d = log_ratio(trainer_logprobs, sampler_logprobs, mask)
        rho = torch.exp(d)
        k3 = torch.where(mask, rho - 1 - d, torch.zeros_like(d))
        low, high = OUTSIDE_BOUNDS
        outside = mask & ((rho < low) | (rho > high))
        return {"tokens": float(mask.sum()), "k3": float(k3.sum()),
                "abs_diff": float(d.abs().sum()), "outside": float(outside.sum())}


def add_sums(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    return {key: total.get(key, 0.0) + value for key, value in part.items()}


def mismatch_metrics(sums: dict[str, float]) -> dict[str, float | None]:
    """The three per-step metrics; None when there were no tokens."""
    tokens = sums.get("tokens", 0.0)
    if not tokens:
        return dict.fromkeys(MISMATCH_KEYS)
    return {"mismatch_kl": sums["k3"] / tokens,
            "mismatch_logprob_diff": sums["abs_diff"] / tokens,
            "mismatch_outside_ratio": sums["outside"] / tokens}


def correction_weights(trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                       mask: torch.Tensor, mode: str, cap: float) -> torch.Tensor:
    """Per-token loss weights [B, L] (fp32, detached, 0 on padding) for `mode`:
    "none" (1 on every response token), "tis" or "mask" (see the module docstring)."""
    if mode not in CORRECTIONS:
        raise ValueError(f"unknown correction {mode!r}; expected one of {CORRECTIONS}")
    if mode != "none" and not cap > 0:
        raise ValueError(f"the correction cap must be > 0 (got {cap})")
    mask = mask.bool()
    with torch.no_grad():
        if mode == "none":
            return mask.float()
        rho = torch.exp(log_ratio(trainer_logprobs, sampler_logprobs, mask))
        if mode == "tis":
            weights = rho.clamp(max=cap)
        else:
            weights = torch.where(rho <= cap, rho, torch.zeros_like(rho))
        return torch.where(mask, weights, torch.zeros_like(weights))


def response_mean_weights(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each response's mean weight over its tokens [B] (NaN for a response with no tokens)."""
    mask = mask.bool()
    counts = mask.sum(-1).float()
    total = torch.where(mask, weights.float(), torch.zeros_like(weights.float())).sum(-1)
    return total / counts
