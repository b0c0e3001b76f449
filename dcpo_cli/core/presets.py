"""The algorithm presets: every component of the objective as one frozen dataclass, and the
four presets as instances of it. No torch here, so the command line can list the choices
without importing it; the math that reads these fields is in `dcpo_cli.core.algorithms`
(docs/design.md section 1).

A new preset is one more `PRESETS` entry (keyword fields) and its name in
`options.ALGORITHMS`, the command line's list (checked here at import).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dcpo_cli.errors import DcpoError, FieldError
from dcpo_cli.options import ADVANTAGES, ALGORITHMS, CLIP_MODES, KL_TYPES, LOSS_AGGS

__all__ = ["ADVANTAGES", "CLIP_MODES", "KL_TYPES", "LOSS_AGGS", "PRESETS", "AlgoConfig",
           "resolve_config", "validate_config"]


@dataclass(frozen=True)
class AlgoConfig:
    """Every component of the objective; a preset is one instance, an ablation a replace()."""

    name: str
    clip: str  # "dac" (per-token bounds from q), "fixed" [1-eps_low, 1+eps_high], "sequence"
    eps_low: float
    eps_high: float
    ratio_max: float  # cap on DAC's upper bound
    dual_clip: float | None  # c of dual clipping for A < 0; None turns it off
    advantage: str  # "sas" or "grpo"
    loss_agg: str
    # DAPO's dynamic sampling, applied as a filter: drop groups whose responses are all
    # correct or all wrong (the scored file's `correct` column, not reward equality)
    drop_uniform_groups: bool
    # KL loss to the reference policy (verl's use_kl_loss): kl_coef * agg(kl_penalty(...)).
    kl_coef: float = 0.0  # 0 turns it off (and the reference model is never loaded)
    kl_type: str = "low_var_kl"  # one of KL_TYPES


PRESETS: dict[str, AlgoConfig] = {
    "dcpo": AlgoConfig(name="dcpo", clip="dac", eps_low=0.16, eps_high=0.2, ratio_max=10.0,
                       dual_clip=10.0, advantage="sas", loss_agg="otm",
                       drop_uniform_groups=False),
    "grpo": AlgoConfig(name="grpo", clip="fixed", eps_low=0.2, eps_high=0.2, ratio_max=10.0,
                       dual_clip=None, advantage="grpo", loss_agg="seq-mean-token-mean",
                       drop_uniform_groups=False, kl_coef=0.001, kl_type="low_var_kl"),
    # The official DAPO baseline runs used dual clipping (c = 10) too.
    "dapo": AlgoConfig(name="dapo", clip="fixed", eps_low=0.2, eps_high=0.28, ratio_max=10.0,
                       dual_clip=10.0, advantage="grpo", loss_agg="token-mean",
                       drop_uniform_groups=True),
    # GSPO's sequence-level objective: one ratio per response, responses averaged.
    # GRPO and GSPO: the official scripts' KL loss, 0.001 low_var_kl (docs/design.md 1.4).
    "gspo": AlgoConfig(name="gspo", clip="sequence", eps_low=3e-4, eps_high=4e-4,
                       ratio_max=10.0, dual_clip=None, advantage="grpo",
                       loss_agg="seq-mean-token-mean", drop_uniform_groups=False,
                       kl_coef=0.001, kl_type="low_var_kl"),
}


assert tuple(PRESETS) == ALGORITHMS, "options.ALGORITHMS names the presets"


def resolve_config(algo: str, **overrides) -> AlgoConfig:
    """The preset `algo` with the given fields replaced (None means "keep the preset's").
    A bad value raises `FieldError` naming the field (`algo`, `eps_low`, ...)."""
    if algo not in PRESETS:
        raise FieldError("algo", f"{algo!r}; choose one of {', '.join(PRESETS)}",
                         prefix="unknown ")
    fields = {f.name for f in dataclasses.fields(AlgoConfig)} - {"name"}
    unknown = set(overrides) - fields
    if unknown:
        raise DcpoError(f"unknown algorithm option(s): {', '.join(sorted(unknown))}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if changes.get("dual_clip") == 0:  # `--dual-clip 0` turns dual clipping off
        changes["dual_clip"] = None
    if changes.get("kl_type") == "k3":  # Schulman's name for low_var_kl
        changes["kl_type"] = "low_var_kl"
    config = dataclasses.replace(PRESETS[algo], **changes)
    validate_config(config)
    return config


def validate_config(config: AlgoConfig) -> None:
    if config.clip not in CLIP_MODES:
        raise FieldError("clip", f"must be one of {', '.join(CLIP_MODES)}, not {config.clip!r}")
    if config.advantage not in ADVANTAGES:
        raise FieldError("advantage", f"must be one of {', '.join(ADVANTAGES)}, "
                         f"not {config.advantage!r}")
    if config.loss_agg not in LOSS_AGGS:
        raise FieldError("loss_agg", f"must be one of {', '.join(LOSS_AGGS)}, "
                         f"not {config.loss_agg!r}")
    if not (config.eps_low >= 0 and config.eps_high >= 0):
        raise FieldError(("eps_low", "eps_high"), "must be >= 0")
    if config.clip != "dac" and config.eps_low >= 1:
        raise FieldError("eps_low", "must be < 1 for fixed or sequence clipping")
    if not config.ratio_max > 1:
        raise FieldError("ratio_max", "must be > 1")
    if config.dual_clip is not None and not config.dual_clip > 1:
        raise FieldError("dual_clip", "must be > 1 (or 0 for off)")
    if not config.kl_coef >= 0:
        raise FieldError("kl_coef", f"must be >= 0 (got {config.kl_coef}; 0 turns it off)")
    if config.kl_type not in KL_TYPES:
        raise FieldError("kl_type", f"must be one of {', '.join(KL_TYPES)}, "
                         f"not {config.kl_type!r}")
