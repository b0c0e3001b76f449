"""`dcpo rollout`: pick step N's prompts, sample --n responses each, write a rollouts file.

Prompt selection depends on the step number alone. Epochs end on a step boundary, as verl's
training dataloader does (`drop_last=True`, the loader the official DCPO runs used): each
epoch is a fresh permutation of the prompt set (seeded by --seed and the epoch), cut into
floor(prompts / --batch-size) slices of --batch-size; step N takes slice N mod that count of
epoch N div that count, and the permutation's last prompts mod --batch-size sit that epoch
out (others the next, since each epoch is shuffled afresh). So a step never holds a prompt
twice, every epoch trains each of its prompts exactly once (which is what SAS's per-prompt
`times` counts), and a shell loop only passes the step: a re-run of a step selects, and on
CPU samples, exactly the same thing.

DAPO's refill adds rounds to a step (`--round k`, default 0): round k takes the next
--batch-size prompts of the sequence after the step's slice (the rest of the epoch's
permutation, its left-out tail included, then the next epochs' permutations) and its earlier
rounds, skipping any prompt this step already used, so the rounds of one step never share a
prompt. They may meet the prompts of later steps: step N+1's slice is fixed by its number
(the permutation advances by --batch-size per step whatever the rounds), which is what keeps
every step a pure function of its number and resumable; round k's prompts are the ones the
next steps of the epoch would draw, so a refilled run sees some prompts earlier than, and
again at, their own step.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from dcpo_cli.engines.base import derive_seed
from dcpo_cli.engines.settings import EngineSettings, ServerAddress
from dcpo_cli.errors import DcpoError
from dcpo_cli.files import contracts
from dcpo_cli.files.model_source import ModelSource, model_identity, policy_step, resolve_model
from dcpo_cli.options import RolloutOptions, parse_shard  # noqa: F401  (public here too)


@dataclass
class RolloutSummary:
    out: Path
    prompts: int
    skipped: int
    responses: int
    tokens: int
    truncated: int
    seconds: float
    load_seconds: float | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def epoch_order(num_prompts: int, epoch: int, seed: int) -> list[int]:
    order = list(range(num_prompts))
    random.Random(derive_seed("epoch", seed, epoch)).shuffle(order)
    return order


def steps_per_epoch(num_prompts: int, batch_size: int) -> int:
    """Steps in one pass over the prompts; the permutation's remainder sits the epoch out."""
    return num_prompts // batch_size


def check_batch_size(num_prompts: int, batch_size: int, source: str | Path) -> None:
    if batch_size > num_prompts:
        raise DcpoError(f"{Path(source).name}: --batch-size {batch_size} is more than its "
                        f"{num_prompts} prompts (a step never holds a prompt twice)")


def _epoch_slot(num_prompts: int, batch_size: int, step: int) -> tuple[int, int]:
    if num_prompts < 1 or batch_size < 1 or step < 0 or batch_size > num_prompts:
        raise ValueError("need 1 <= batch_size <= num_prompts and step >= 0")
    return divmod(step, steps_per_epoch(num_prompts, batch_size))


def select_prompts(num_prompts: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of step `step`'s prompts: slice `slot` of epoch `epoch`'s permutation (see
    the module docstring)."""
    epoch, slot = _epoch_slot(num_prompts, batch_size, step)
    return epoch_order(num_prompts, epoch, seed)[slot * batch_size:(slot + 1) * batch_size]


def select_round(num_prompts: int, batch_size: int, step: int, seed: int,
                 round_index: int) -> list[int]:
    """Indices of round `round_index` of step `step` (round 0 is `select_prompts`); see the
    module docstring."""
    first = select_prompts(num_prompts, batch_size, step, seed)
    if round_index == 0:
        return first
    if (round_index + 1) * batch_size > num_prompts:
        raise DcpoError(f"--round {round_index}: {round_index + 1} rounds of --batch-size "
                        f"{batch_size} need {(round_index + 1) * batch_size} distinct prompts; "
                        f"the prompts file has {num_prompts}")
    used = set(first)
    epoch, slot = _epoch_slot(num_prompts, batch_size, step)
    # the position after the step's slice in the endless sequence of epoch permutations
    position = epoch * num_prompts + (slot + 1) * batch_size
    orders: dict[int, list[int]] = {}
    chosen: list[int] = []
    for _ in range(round_index):
        chosen = []
        while len(chosen) < batch_size:
            epoch = position // num_prompts
            if epoch not in orders:
                orders[epoch] = epoch_order(num_prompts, epoch, seed)
            index = orders[epoch][position % num_prompts]
            position += 1
            if index not in used:
                used.add(index)
                chosen.append(index)
    return chosen


def shard_part(items: list, shard: tuple[int, int]) -> list:
    """Shard i of n: the i-th of n contiguous, near-equal parts of `items`."""
    index, count = shard
    size, extra = divmod(len(items), count)
    start = index * size + min(index, extra)
    return items[start:start + size + (1 if index < extra else 0)]


def engine_record(engine: Any, settings: EngineSettings) -> dict[str, Any]:
    """The metadata naming how the tokens were generated. Through `dcpo serve`: the served
    engine's settings (the client's flags are not what generated) and the server (its URL,
    and the fingerprint of the weights it generated with); in process, no server."""
    return {"engine_settings": getattr(engine, "settings_record", None) or settings.record(),
            "generation_server": getattr(engine, "server_record", None)}


def _prompt_value(value: Any) -> str | list[dict]:
    return value if isinstance(value, str) else [dict(m) for m in value]


def run_rollout(model: str | Path | ModelSource, prompts_path: str | Path, step: int,
                out: str | Path, options: RolloutOptions, *, engine: Any = None,
                engine_settings: EngineSettings | None = None,
                server: ServerAddress | None = None) -> RolloutSummary:
    """Generate step `step`'s rollouts and write them to `out`. `model` is a directory or a
    Hub id[@revision]. `engine` replaces the real one (benchmarks and tests pass a loaded
    engine); otherwise it is loaded from `model` with `engine_settings` (with `--engine
    server`, a client of the `dcpo serve` at `server`, which then serves `model`)."""
    from dcpo_cli.console import progress
    from dcpo_cli.engines import SamplingSettings, engine_options, load_engine, pick_engine
    from dcpo_cli.engines.prompting import encode_prompts

    options.check()
    engine_settings = engine_settings or EngineSettings()
    kind = pick_engine(options.engine)
    engine_options(kind, engine_settings, server)  # a bad setting stops the run here
    if step < 0:
        raise DcpoError("--step must be >= 0")
    contracts.check_output_path(out)
    table = contracts.read_table(prompts_path, "prompts")
    check_batch_size(table.num_rows, options.batch_size, prompts_path)
    source = resolve_model(model)
    fingerprint = model_identity(source)  # cheap: no weight byte is read
    sampled_by = policy_step(source.path)  # train-step measures the staleness from it
    load_seconds = None  # the engine's cold start (or the server's weight switch), if paid
    if engine is None:
        started = time.perf_counter()
        engine = load_engine(kind, source.path,
                             **engine_options(kind, engine_settings, server, source))
        load_seconds = time.perf_counter() - started

    chosen = shard_part(select_round(table.num_rows, options.batch_size, step, options.seed,
                                     options.round), options.shard)
    records = table.select(["prompt_id", "prompt", "answer"]).take(chosen).to_pylist()
    encoded = encode_prompts(engine.tokenizer, [_prompt_value(r["prompt"]) for r in records],
                             options.chat_template)
    limit = options.max_prompt_tokens
    keep = [i for i, (_, ids) in enumerate(encoded) if limit is None or len(ids) <= limit]
    skipped = len(records) - len(keep)
    if not keep:
        raise DcpoError(f"{Path(prompts_path).name}: all {len(records)} prompts of step {step} "
                        f"are longer than --max-prompt-tokens {limit}")
    settings = SamplingSettings(
        n=options.n, temperature=options.temperature, top_p=options.top_p, top_k=options.top_k,
        max_new_tokens=options.max_new_tokens,
        # round 0 keeps the seed it had before rounds existed
        seed=derive_seed("rollout", options.seed, step, options.shard,
                         *((options.round,) if options.round else ())),
    )

    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"rollout step {step}", total=len(keep) * options.n, info="")

        def report(responses: int, tokens: int) -> None:
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            bar.update(task, completed=responses, info=f"{tokens} tok, {rate:,.0f} tok/s")

        completions = engine.generate([encoded[i][1] for i in keep], settings, report)
    seconds = time.perf_counter() - started

    rows: dict[str, list] = {name: [] for name in contracts.ROLLOUT_COLUMNS}
    for i, group in zip(keep, completions, strict=True):
        text, prompt_ids = encoded[i]
        for sample_index, completion in enumerate(group):
            for name, value in (
                ("step", step), ("prompt_id", records[i]["prompt_id"]),
                ("sample_index", sample_index), ("prompt_text", text),
                ("prompt_token_ids", prompt_ids), ("response_text", completion.text),
                ("response_token_ids", completion.token_ids),
                ("response_logprobs", completion.logprobs),
                ("finish_reason", completion.finish_reason), ("answer", records[i]["answer"]),
            ):
                rows[name].append(value)
    schema = pa.schema([(name, kind) for name, kind in contracts.ROLLOUT_COLUMNS.items()])
    result = pa.table(rows, schema=schema)

    option_record = {**asdict(options), "shard": f"{options.shard[0]}/{options.shard[1]}"}
    metadata = contracts.make_metadata(
        "rollouts", "rollout", step=step, options=option_record, inputs=[prompts_path],
        extra={"round": options.round, **source.record(), "model_fingerprint": fingerprint,
               "policy_step": sampled_by, "engine": engine.name,
               "seed": options.seed, "sampling_seed": settings.seed,
               "max_new_tokens": options.max_new_tokens, "selected_prompts": len(records),
               "skipped_prompts": skipped, **engine_record(engine, engine_settings),
               "engine_load_seconds": None if load_seconds is None else round(load_seconds, 2),
               "generate_seconds": round(seconds, 2)},
    )
    contracts.write_table(result, out, metadata)
    tokens = sum(len(ids) for ids in rows["response_token_ids"])
    truncated = sum(reason == "length" for reason in rows["finish_reason"])
    return RolloutSummary(Path(out), len(keep), skipped, result.num_rows, tokens, truncated,
                          seconds, load_seconds)
