"""`dcpo score`: attach rewards to responses, from one or several rollout shards.

Inputs need only `prompt_id`, `response_text` and `answer` (contracts.SCOREABLE_COLUMNS), so
generations made by other tools can be scored too. The output keeps every input column and
adds `reward`, `correct`, `extracted_answer` ("" when the response has no box),
`reward_level`, `verify_timeout`, `verify_error`, and `overlong_penalty` when shaping is on.

Every reward comes from a reward function (the interface: dcpo_cli.rewards), math-verify's
by default, `--reward package.module:function` otherwise, all through one path. A function
returns a number (the reward) or a level (docs/design.md 1.4): "correct" (1.0), "wrong" (a
boxed answer that does not verify: --wrong-reward) or "no_answer" (no parseable `\boxed{}`
answer: --no-answer-reward, default --wrong-reward). `--no-answer-reward R` turns on the
official DCPO recipe's third level, 1 / 0 / -1 with R = -1: there a response cut off at the
length limit (finish_reason "length") counts as no answer whatever its text holds, and is
not `correct`. Without the flag a cut-off response is judged by its box as before (DAPO's
overlong shaping relies on that: a right but overlong answer gets 1 + penalty). A function
that returns numbers gives every reward itself; the level is still recorded (correct when
its reward is > 0, else wrong with a box, else no_answer), and --no-answer-reward is
refused beside it.

The output is marked kind "scored" when the inputs were rollouts (the scored contract
train-step reads), else kind "scored-responses" (scored, but not trainable: token ids or
log-probs are missing).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dcpo_cli.errors import DcpoError
from dcpo_cli.files import contracts
from dcpo_cli.options import DEFAULT_REWARD, REWARD_LEVELS, ScoreOptions

ADDED_COLUMNS = ("reward", "correct", "extracted_answer", contracts.REWARD_LEVEL_COLUMN,
                 "verify_timeout", "verify_error", "overlong_penalty")
PARTIAL_KIND = "scored-responses"


@dataclass
class ScoreSummary:
    out: Path
    kind: str
    responses: int
    correct: int
    timeouts: int
    errors: int
    mean_reward: float
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.responses if self.responses else 0.0

    @property
    def responses_per_second(self) -> float:
        return self.responses / self.seconds if self.seconds > 0 else 0.0


def read_inputs(paths: list[Path]) -> tuple[pa.Table, list[dict[str, Any]]]:
    """One table from all shards (same columns required) and each shard's metadata."""
    if not paths:
        raise DcpoError("give at least one rollouts file to score")
    tables, metadata = [], []
    for path in paths:
        table = contracts.read_table(path, "scoreable", contracts.SCOREABLE_COLUMNS)
        table = table.drop_columns([c for c in ADDED_COLUMNS if c in table.column_names])
        if tables and set(table.column_names) != set(tables[0].column_names):
            raise DcpoError(f"{Path(path).name}: its columns differ from those of "
                            f"{Path(paths[0]).name}; shards of one step must match")
        tables.append(_cast_known(table.select(tables[0].column_names) if tables else table))
        metadata.append(contracts.read_metadata(path))
    table = pa.concat_tables(tables, promote_options="permissive")
    _check_unique(table, paths)
    return table, metadata


def _cast_known(table: pa.Table) -> pa.Table:
    """Bring contract columns to their contract types (large_string, int32, ... from
    other tools), so shards concatenate and the output meets the contract."""
    for name, kind in contracts.ROLLOUT_COLUMNS.items():
        if name not in table.column_names or kind is None:
            continue
        if table.schema.field(name).type != kind:
            try:
                column = table.column(name).cast(kind)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue  # left as is; the contract check reports it if it matters
            table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def _check_unique(table: pa.Table, paths: list[Path]) -> None:
    names = ", ".join(Path(p).name for p in paths)
    contracts.check_unique_responses(table, names, "; was a shard given twice?")


def max_length_from(metadata: list[dict[str, Any]], options: ScoreOptions) -> int:
    """L_max for overlong shaping: --max-length, else the rollouts' max_new_tokens."""
    if options.max_length is not None:
        return options.max_length
    values = {m.get("max_new_tokens") for m in metadata}
    if None in values:
        raise DcpoError("--overlong-buffer needs the rollouts' max_new_tokens, which a file "
                        "lacks in its metadata; pass --max-length")
    if len(values) > 1:
        raise DcpoError(f"--overlong-buffer: the shards were made with different "
                        f"max_new_tokens {sorted(values)}; pass --max-length")
    return values.pop()


SAMPLING_KEYS = ("temperature", "top_p", "top_k")


def sampling_from(metadata: list[dict[str, Any]], paths: list[Path]) -> dict[str, Any] | None:
    """The rollouts' sampling options (temperature, top_p, top_k) for the scored metadata:
    train-step computes its log-probs at the rollouts' temperature. None when a shard does
    not record them (files from other tools); a key is None where shards differ, except the
    temperature, which must agree (one step's log-probs are of one distribution)."""
    records = [m.get("options") if isinstance(m.get("options"), dict) else {} for m in metadata]
    if not records or any("temperature" not in r for r in records):
        return None
    temperatures = {r["temperature"] for r in records}
    if len(temperatures) > 1:
        names = ", ".join(f"{Path(p).name}: {r['temperature']}"
                          for p, r in zip(paths, records, strict=True))
        raise DcpoError(f"the rollout shards were sampled at different temperatures ({names});"
                        " shards of one step must match")
    sampling = {}
    for key in SAMPLING_KEYS:
        values = {r.get(key) for r in records}
        sampling[key] = values.pop() if len(values) == 1 else None
    return sampling


def policy_from(metadata: list[dict[str, Any]], paths: list[Path]) -> dict[str, Any]:
    """Which policy sampled the rollouts, for train-step's staleness check: the rollouts'
    `policy_step` (the sampling checkpoint's global step) and `model`, carried into the
    scored metadata as `policy_step` and `policy_model`. None where a shard does not record
    it (an older dcpo, another tool); shards of one step sampled by different policies are
    refused."""
    steps = [m.get("policy_step") for m in metadata]
    if any(not isinstance(step, int) for step in steps):
        return {"policy_step": None, "policy_model": None}
    if len(set(steps)) > 1:
        names = ", ".join(f"{Path(p).name}: step {s}" for p, s in zip(paths, steps, strict=True))
        raise DcpoError(f"the rollout shards were sampled by different policies ({names}); "
                        "shards of one step must come from one checkpoint")
    return {"policy_step": steps[0], "policy_model": metadata[0].get("model")}


def reward_rows(table: pa.Table) -> list[dict[str, Any]]:
    """What a reward function gets as `row`: every column but the per-token lists (they
    would cost more to ship to the workers than most rewards take), plus response_length."""
    scalar = [f.name for f in table.schema
              if not (pa.types.is_list(f.type) or pa.types.is_large_list(f.type))]
    rows = table.select(scalar).to_pylist()
    if "response_token_ids" in table.column_names:
        lengths = pc.list_value_length(table.column("response_token_ids")).to_pylist()
        for row, length in zip(rows, lengths, strict=True):
            row["response_length"] = length
    return rows


def settle(value: float | str | None, has_box: bool, cut_off: bool,
           options: ScoreOptions) -> tuple[str, float]:
    """A response's level and reward from what its reward function gave.

    A level name gets the level's reward (1, --wrong-reward, --no-answer-reward); a response
    `cut_off` at the length limit under the three-level reward is no_answer whatever its text
    holds. A number is the reward itself; its level is only recorded (correct when > 0, else
    by the box). A timed-out or failed call (None) counts as a wrong answer."""
    if value is None:
        value = "wrong"
    if isinstance(value, str):
        level = "no_answer" if cut_off else value
        return level, level_reward(level, options)
    return ("correct" if value > 0 else "wrong" if has_box else "no_answer"), value


def level_reward(level: str, options: ScoreOptions) -> float:
    """The reward of a level: 1, --wrong-reward, --no-answer-reward."""
    if level == "correct":
        return 1.0
    if level == "no_answer" and options.no_answer_reward is not None:
        return options.no_answer_reward
    return options.wrong_reward


def _check_judgements(judgements: list, spec: str, options: ScoreOptions) -> None:
    for index, judgement in enumerate(judgements):
        # math-verify's parser failing on a malformed answer is the response's fault (scored
        # wrong, counted in verify_error); an exception in your function is a bug to fix.
        if judgement.error is not None and spec != DEFAULT_REWARD:
            raise DcpoError(f"--reward {spec}: failed on row {index} ({judgement.error})")
        if options.no_answer_reward is not None and isinstance(judgement.value, float):
            raise DcpoError(f"--no-answer-reward sets the reward of the level no_answer, but "
                            f"--reward {spec} returned a number (row {index}); return level "
                            f"names ({', '.join(REWARD_LEVELS)}) or drop --no-answer-reward")


def score_table(table: pa.Table, options: ScoreOptions, max_length: int | None = None,
                on_progress=None) -> pa.Table:
    """The input table plus the reward columns (pure apart from running the reward)."""
    from dcpo_cli.rewards import extract_boxed, judge, overlong_penalty

    spec = options.reward or DEFAULT_REWARD
    responses = table.column("response_text").to_pylist()
    judgements = judge(spec, responses, table.column("answer").to_pylist(), reward_rows(table),
                       workers=options.workers, timeout=options.timeout,
                       on_progress=on_progress)
    _check_judgements(judgements, spec, options)
    extracted = [extract_boxed(text) or "" for text in responses]
    cut = [False] * len(responses)
    if options.no_answer_reward is not None and "finish_reason" in table.column_names:
        cut = [reason == "length" for reason in table.column("finish_reason").to_pylist()]
    settled = [settle(j.value, bool(box.strip()), cut_off, options)
               for j, box, cut_off in zip(judgements, extracted, cut, strict=True)]
    levels = [level for level, _ in settled]
    rewards = [reward for _, reward in settled]
    columns = {"reward": pa.array(rewards, pa.float64()),
               "correct": pa.array([level == "correct" for level in levels]),
               "extracted_answer": pa.array(extracted, pa.string()),
               contracts.REWARD_LEVEL_COLUMN: pa.array(levels, pa.string()),
               "verify_timeout": pa.array([j.timed_out for j in judgements]),
               "verify_error": pa.array([j.error is not None for j in judgements])}
    if options.overlong_buffer:
        if "response_token_ids" not in table.column_names:
            raise DcpoError("--overlong-buffer needs the column 'response_token_ids' "
                            "(response lengths in tokens)")
        lengths = pc.list_value_length(table.column("response_token_ids")).to_pylist()
        penalties = [overlong_penalty(n, max_length, options.overlong_buffer) for n in lengths]
        columns["reward"] = pa.array([r + p for r, p in zip(rewards, penalties, strict=True)],
                                     pa.float64())
        columns["overlong_penalty"] = pa.array(penalties, pa.float64())
    for name, values in columns.items():
        table = table.append_column(name, values)
    return table


def group_outcomes(scored: pa.Table) -> dict[str, set[bool]]:
    """The set of `correct` values of each prompt's responses: a group with both is mixed
    (the groups DAPO's filter keeps)."""
    outcomes: dict[str, set[bool]] = {}
    for prompt_id, ok in zip(scored.column("prompt_id").to_pylist(),
                             scored.column("correct").to_pylist(), strict=True):
        outcomes.setdefault(prompt_id, set()).add(bool(ok))
    return outcomes


def run_score(paths: list[Path], out: Path, options: ScoreOptions) -> ScoreSummary:
    from dcpo_cli.console import progress

    options.check()
    contracts.check_output_path(out)
    table, metadata = read_inputs(paths)
    sampling = sampling_from(metadata, paths)
    policy = policy_from(metadata, paths)
    rounds = {m.get("round", 0) for m in metadata}
    if len(rounds) > 1:  # train-step orders the rounds by the scored files' metadata
        raise DcpoError(f"the rollouts come from different refill rounds {sorted(rounds)}; "
                        "score each round into its own file")
    max_length = max_length_from(metadata, options) if options.overlong_buffer else None
    from dcpo_cli.rewards import load_reward_function

    load_reward_function(options.reward or DEFAULT_REWARD)  # a bad spec fails before any work
    started = time.perf_counter()
    # transient: an error mid-way leaves only its one line; the summary follows on success
    with progress(transient=True) as bar:
        task = bar.add_task("score", total=table.num_rows, info="")

        def report(done: int) -> None:
            bar.advance(task, done)
            rate = bar.tasks[0].completed / max(time.perf_counter() - started, 1e-9)
            bar.update(task, info=f"{rate:,.0f} responses/s")

        scored = score_table(table, options, max_length, report)
    seconds = time.perf_counter() - started

    kind = "scored" if set(contracts.ROLLOUT_COLUMNS) <= set(scored.column_names) else PARTIAL_KIND
    steps = {m.get("step") for m in metadata}
    correct = sum(scored.column("correct").to_pylist())
    timeouts = sum(scored.column("verify_timeout").to_pylist())
    errors = sum(scored.column("verify_error").to_pylist())
    mean_reward = pc.mean(scored.column("reward")).as_py()
    lengths = {m.get("max_new_tokens") for m in metadata}
    groups = group_outcomes(scored)
    levels = scored.column(contracts.REWARD_LEVEL_COLUMN).to_pylist()
    extra = {"round": rounds.pop(),
             "groups": len(groups), "mixed_groups": sum(len(g) == 2 for g in groups.values()),
             "reward_levels": {level: levels.count(level) for level in contracts.REWARD_LEVELS},
             "reward_function": options.reward or DEFAULT_REWARD,
             "max_new_tokens": max_length or (lengths.pop() if len(lengths) == 1 else None),
             "accuracy": correct / scored.num_rows, "verify_timeouts": timeouts,
             "verify_errors": errors, "sampling": sampling, **policy}
    meta = contracts.make_metadata(kind, "score", step=steps.pop() if len(steps) == 1 else None,
                               options=asdict(options), inputs=paths, extra=extra)
    contracts.write_table(scored, out, meta)
    return ScoreSummary(Path(out), kind, scored.num_rows, correct, timeouts, errors,
                        mean_reward, seconds)
