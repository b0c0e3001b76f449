"""train-step inputs: a rollout step's scored shards, read and checked into one `StepData`,
and the advantages of its rows."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dcpo_cli.core import algorithms
from dcpo_cli.core.batching import group_rows
from dcpo_cli.core.presets import AlgoConfig
from dcpo_cli.errors import DcpoError
from dcpo_cli.files import contracts
from dcpo_cli.files.sas_state import SasState


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
    # The sampler's log-probs of each response token (`response_logprobs`), or None when a
    # shard lacks them (then `sampler_missing` says which file and why).
    sampler_logprobs: list[list[float]] | None = None
    sampler_missing: str | None = None
    # The rollouts' sampling options (from the scored metadata) and the temperature the
    # trainer's log-probs are computed at: the rollouts' (greedy, T = 0, counts as 1).
    sampling: dict | None = None
    temperature: float = 1.0
    rounds: list[int] = field(default_factory=list)  # the rollout round of each row (refill)
    groups_generated: int | None = None  # groups in the shards, before any selection
    groups_kept: int | None = None  # of those, groups the filter keeps
    # The policy that sampled the responses (the scored metadata's `policy_step` and
    # `policy_model`): None when a shard does not record it (older files, other tools).
    policy_step: int | None = None
    policy_model: str | None = None

    @property
    def num_rows(self) -> int:
        return len(self.prompt_ids)


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
    samplings: dict[str, dict | None] = {}
    policies: dict[str, tuple] = {}
    sampler: list[list[float]] = []
    for path, name in zip(paths, names, strict=True):
        # response_logprobs are optional here: only the mismatch metrics and the rollout
        # correction read them (files from other tools may lack them).
        table = contracts.read_table(path, "scored", {
            k: v for k, v in contracts.SCORED_COLUMNS.items() if k != "response_logprobs"})
        column_steps = set(table.column("step").to_pylist())
        metadata = contracts.read_metadata(path)
        meta_step = metadata.get("step")
        limits.add(metadata.get("max_new_tokens"))
        policies[name] = (metadata.get("policy_step"), metadata.get("policy_model"))
        samplings[name] = metadata.get("sampling") if isinstance(metadata.get("sampling"),
                                                                 dict) else None
        if len(column_steps) != 1:
            raise DcpoError(f"{name}: rows from several steps {sorted(column_steps)}")
        step = meta_step if isinstance(meta_step, int) else column_steps.pop()
        if meta_step is not None and {meta_step} != set(table.column("step").to_pylist()):
            raise DcpoError(f"{name}: metadata step {meta_step} differs from the 'step' column")
        steps[name] = step
        round_index = metadata.get("round", 0)
        data.rounds += [round_index if isinstance(round_index, int) else 0] * table.num_rows
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
        if data.sampler_missing is None:
            logprobs, data.sampler_missing = _sampler_logprobs(table, name,
                                                               columns["response_token_ids"])
            sampler += logprobs
        data.checksums[name] = contracts.file_checksum(path)  # by name: a moved run resumes
    if len(set(steps.values())) != 1:
        listing = ", ".join(f"{n}: {s}" for n, s in steps.items())
        raise DcpoError(f"the scored files come from different steps ({listing})")
    data.step = next(iter(steps.values()))
    data.max_new_tokens = limits.pop() if len(limits) == 1 else None
    data.sampler_logprobs = sampler if data.sampler_missing is None else None
    data.sampling, data.temperature = _sampling(samplings)
    data.policy_step, data.policy_model = _policy(policies)
    keys = list(zip(data.prompt_ids, data.sample_index, strict=True))
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise DcpoError(f"response ({dup[0]!r}, sample {dup[1]}) appears twice in the scored "
                        "files")
    return data


def _sampler_logprobs(table, name: str, responses: list[list[int]]
                      ) -> tuple[list[list[float]], str | None]:
    """A shard's `response_logprobs`, or ([], why they cannot be used)."""
    if "response_logprobs" not in table.column_names:
        return [], f"{name}: no column 'response_logprobs'"
    values = table.column("response_logprobs").to_pylist()
    for i, (logprobs, tokens) in enumerate(zip(values, responses, strict=True)):
        if logprobs is None or len(logprobs) != len(tokens):
            return [], (f"{name}: row {i}'s 'response_logprobs' do not match its "
                        "response tokens")
        if any(v is None or not math.isfinite(v) for v in logprobs):
            return [], f"{name}: row {i}'s 'response_logprobs' hold missing or non-finite values"
    return values, None


def _sampling(samplings: dict[str, dict | None]) -> tuple[dict | None, float]:
    """The shards' common sampling options and the trainer's temperature."""
    temperatures = {name: (s or {}).get("temperature") for name, s in samplings.items()}
    if len(set(temperatures.values())) > 1:
        listing = ", ".join(f"{n}: {t}" for n, t in temperatures.items())
        raise DcpoError(f"the scored files were sampled at different temperatures ({listing})")
    sampling = next(iter(samplings.values()))
    temperature = next(iter(temperatures.values()))
    if temperature is None:  # not recorded (an older dcpo score, another tool): as before
        return sampling, 1.0
    if not isinstance(temperature, (int, float)) or temperature < 0:
        name = next(iter(samplings))
        raise DcpoError(f"{name}: metadata temperature {temperature!r} is not a number >= 0")
    # Greedy rollouts (T = 0) have no sampling distribution; score them at the model's own.
    return sampling, float(temperature) if temperature > 0 else 1.0


def _policy(policies: dict[str, tuple]) -> tuple[int | None, str | None]:
    """The shards' common sampling policy (step, model); (None, None) when one lacks it."""
    steps = {name: step for name, (step, _) in policies.items()}
    if any(not isinstance(step, int) or isinstance(step, bool) for step in steps.values()):
        return None, None
    if len(set(steps.values())) > 1:
        listing = ", ".join(f"{n}: step {s}" for n, s in steps.items())
        raise DcpoError(f"the scored files were sampled by different policies ({listing}); "
                        "the shards and rounds of one step come from one checkpoint")
    return next(iter(policies.values()))


def check_vocab(data: StepData, vocab: int) -> None:
    for row in range(data.num_rows):
        for column, tokens in (("prompt_token_ids", data.prompt_tokens[row]),
                               ("response_token_ids", data.response_tokens[row])):
            bad = [t for t in tokens if t < 0 or t >= vocab]
            if bad:
                raise DcpoError(f"{data.files[row]}: '{column}' holds token id {bad[0]} outside "
                                f"the model's vocabulary of {vocab} "
                                f"(prompt {data.prompt_ids[row]!r})")




def is_uniform(data: StepData, rows: list[int]) -> bool:
    """All responses correct or all wrong: DAPO's filter (on accuracy, as the official runs;
    not on reward equality, which shaped rewards would rarely meet)."""
    return len({data.correct[r] for r in rows}) == 1


def select_groups(data: StepData, config: AlgoConfig, target: int | None) -> StepData:
    """The step's groups in training order (rollout round, then prompt order) and, with a
    `target`, only those up to the `target`-th kept group: DAPO's refill, in which extra
    rounds of rollouts top the step up to `target` kept prompts. Later groups are left out
    entirely: not trained, not absorbed into the SAS state, not in the train records (they
    count in `groups_generated`). Fewer kept groups than `target` trains on all of them."""
    groups = sorted(group_rows(data.prompt_ids), key=lambda rows: (data.rounds[rows[0]], rows[0]))
    kept = [not (config.drop_uniform_groups and is_uniform(data, rows)) for rows in groups]
    used = groups
    if target is not None:
        count = 0
        for position, keep in enumerate(kept):
            count += keep
            if count == target:
                used = groups[:position + 1]
                break
    if target is None and len(set(data.rounds)) <= 1:
        subset = dataclasses.replace(data)  # one round, no target: every row, as read
    else:
        subset = _take_rows(data, [row for group in used for row in group])
    subset.groups_generated, subset.groups_kept = len(groups), sum(kept)
    return subset


def _take_rows(data: StepData, rows: list[int]) -> StepData:
    """`data` with only `rows`, in that order (every per-row list field follows)."""
    count = data.num_rows
    changes = {f.name: [getattr(data, f.name)[r] for r in rows]
               for f in dataclasses.fields(data)
               if isinstance(getattr(data, f.name), list) and len(getattr(data, f.name)) == count}
    return dataclasses.replace(data, **changes)


@dataclass
class StepAdvantages:
    values: list[float]  # one per row
    groups: list[list[int]]  # the rows of each group to train on
    dropped: int  # groups left out (all rewards equal, when the preset drops them)
    new_state: SasState  # the SAS state after this step (not yet written)


def compute_advantages(data: StepData, config: AlgoConfig, state: SasState, state_path: Path
                       ) -> StepAdvantages:
    """Advantage of every row under the configured estimator, and the groups to train on."""
    advantages = [0.0] * data.num_rows
    keep, dropped = [], 0
    updates = {}
    for rows in group_rows(data.prompt_ids):
        prompt_id = data.prompt_ids[rows[0]]
        if len(rows) < 2:
            raise DcpoError(f"{data.files[rows[0]]}: prompt {prompt_id!r} has a single "
                            "response; group advantages need at least 2 per prompt (--n >= 2)")
        rewards = torch.tensor([data.rewards[r] for r in rows], dtype=torch.float64)
        adv, updates[prompt_id] = algorithms.group_advantages(config.advantage, rewards,
                                                              state.get(prompt_id))
        for row, value in zip(rows, adv.tolist(), strict=True):
            advantages[row] = float(value)
        if config.drop_uniform_groups and is_uniform(data, rows):
            dropped += 1
        else:
            keep.append(rows)
    return StepAdvantages(advantages, keep, dropped, state.absorb(data.step, updates, state_path))
