"""What a train-step reports: the step's metrics, the per-response records, the table."""

from __future__ import annotations

import math
from typing import Any

from dcpo_cli.core import algorithms, mismatch
from dcpo_cli.files import contracts
from dcpo_cli.train.inputs import StepAdvantages, StepData
from dcpo_cli.train.update import UpdateState

RECORDS = "train_records.parquet"
METRICS = "metrics.json"


def step_metrics(data: StepData, advantages: StepAdvantages, state: UpdateState, algo: str
                 ) -> dict[str, Any]:
    """What the step measured; the caller adds the lr, its counters and timings."""
    tokens = max(state.clip_counts["tokens"], 1)
    lengths = [len(r) for r in data.response_tokens]
    norms = state.grad_norms
    return {
        "algo": algo,
        **algorithms.clip_fractions(state.clip_counts),
        "nonzero_advantage_ratio": algorithms.nonzero_advantage_ratio(advantages.values),
        "reward_mean": sum(data.rewards) / data.num_rows,
        "accuracy": sum(data.correct) / data.num_rows,
        "response_length_mean": sum(lengths) / data.num_rows,
        "response_length_max": max(lengths),
        "truncated_ratio": sum(data.truncated) / data.num_rows,
        "approx_kl": state.kl_sum / tokens,
        "entropy": state.entropy if math.isfinite(state.entropy) else None,
        "grad_norm": sum(norms) / len(norms) if norms else 0.0,
        "grad_norm_max": max(norms) if norms else 0.0,
        "loss": sum(state.losses) / len(state.losses) if state.losses else 0.0,
        "updates": state.updates,
        "responses": data.num_rows,
        "prompts": len(advantages.groups) + advantages.dropped,
        "dropped_groups": advantages.dropped,
        # DAPO's cost: groups sampled, of which the filter kept, of which the step trained
        "groups_generated": data.groups_generated or len(advantages.groups) + advantages.dropped,
        "groups_kept": (data.groups_kept if data.groups_kept is not None
                        else len(advantages.groups)),
        "groups_trained": len(advantages.groups),
    }


def records_table(data: StepData, advantages: list[float], state: UpdateState,
                  correction: str = "none", cap: float = 2.0, staleness: int | None = None):
    """One row per response the step considered. Responses of dropped groups were not
    trained: their clipped count is 0 and their log-prob means are NaN. Groups sampled after
    --target-prompts was reached are not here at all (see inputs.select_groups).
    `new_logprob_mean` is the response's mean log-prob as the loss saw it in the last epoch
    (after the updates before its mini-batch). `rollout_weight_mean` is the mean weight
    --rollout-correction gave its tokens' losses. `staleness` (contracts.STALENESS_COLUMN,
    beside the contract's columns): train steps between the sampling policy and --model,
    null where the scored files do not record their sampling policy."""
    import pyarrow as pa

    old, nan = state.old, float("nan")
    columns = {
        "step": [data.step] * data.num_rows,
        "prompt_id": data.prompt_ids,
        "sample_index": data.sample_index,
        "reward": data.rewards,
        "advantage": advantages,
        "response_tokens": [len(r) for r in data.response_tokens],
        "clipped_tokens": [state.row_clipped.get(r, 0) for r in range(data.num_rows)],
        "old_logprob_mean": [float(old[r].mean()) if r in old else nan
                             for r in range(data.num_rows)],
        "new_logprob_mean": [state.row_new.get(r, nan) for r in range(data.num_rows)],
        "rollout_weight_mean": rollout_weight_means(data, state, correction, cap),
    }
    schema = pa.schema([(name, contracts.TRAIN_RECORD_COLUMNS[name]) for name in columns])
    table = pa.table(columns, schema=schema)
    return table.append_column(contracts.STALENESS_COLUMN,
                               pa.array([staleness] * data.num_rows, pa.int64()))


def rollout_weight_means(data: StepData, state: UpdateState, correction: str, cap: float
                         ) -> list[float]:
    """Per response: the mean rollout-correction weight of its tokens (weights depend only
    on pi_old and pi_sampler, so they are the same in every epoch); 1 without a correction,
    NaN for responses not trained."""
    import torch

    means = []
    for row in range(data.num_rows):
        old = state.old.get(row)
        if old is None:
            means.append(float("nan"))
        elif correction == "none":
            means.append(1.0)
        else:
            mask = torch.ones_like(old, dtype=torch.bool)
            sampler = torch.tensor(data.sampler_logprobs[row], dtype=torch.float32)
            weights = mismatch.correction_weights(old, sampler, mask, correction, cap)
            means.append(float(mismatch.response_mean_weights(weights[None], mask[None])[0]))
    return means


def mismatch_report(data: StepData, state: UpdateState) -> dict[str, float | None]:
    """mismatch_kl, mismatch_logprob_diff, mismatch_outside_ratio over the step's trained
    tokens: the trainer's old log-probs (at the rollouts' temperature) against the
    sampler's `response_logprobs`, once per response; None without sampler log-probs."""
    import torch

    if data.sampler_logprobs is None:
        return dict.fromkeys(mismatch.MISMATCH_KEYS)
    sums: dict[str, float] = {}
    for row, old in state.old.items():
        sampler = torch.tensor(data.sampler_logprobs[row], dtype=torch.float32)
        sums = mismatch.add_sums(sums, mismatch.mismatch_sums(
            old, sampler, torch.ones_like(old, dtype=torch.bool)))
    return mismatch.mismatch_metrics(sums)


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
