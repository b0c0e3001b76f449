"""The small interface every generation back end implements."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

ProgressCallback = Callable[[int, int], None]  # (responses done, tokens done), cumulative
# Asked between decoding steps or batches: True ends the generation with `Stopped`
# (`dcpo serve`: the client went away, the request's time is up, the server is stopping).
StopCheck = Callable[[], bool]


class Stopped(Exception):
    """A generation ended early because its `should_stop` said so."""


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample. temperature 0 means greedy; top_k 0 means no top-k filter."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One response. `token_ids` keep the final eos token (the policy must learn to emit it);
    `text` is `tokenizer.decode(token_ids, skip_special_tokens=True)`. `logprobs[i]` is the
    log-probability of `token_ids[i]` under the distribution it was sampled from (after
    temperature / top-k / top-p; the model's own distribution for greedy decoding)."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: Literal["stop", "length"]


class Engine(Protocol):
    name: str
    tokenizer: object

    def generate(self, prompt_token_ids: list[list[int]], settings: SamplingSettings,
                 on_progress: ProgressCallback | None = None,
                 should_stop: StopCheck | None = None) -> list[list[Completion]]:
        """`settings.n` completions for each prompt, in prompt order (or `Stopped`)."""
        ...


# Data-parallel generation (`dcpo run --nproc-per-node N`): an engine may also have
# `generate_part(prompt_token_ids, settings, part, on_progress)`, where `part` = (i, n):
# the same list as `generate` returns, with only the completions of share i of n filled in
# and None elsewhere, each one exactly what `generate` over the whole list gives it (the
# shares of n ranks, merged with `merge_parts`, are `generate`'s result). How the rows are
# shared is the engine's: hf deals out its token-budget batches (a batch's samples depend
# on its rows alone, `batch_seed`), vLLM contiguous prompts (one seed per prompt).
Part = tuple[int, int]


def share(count: int, part: Part) -> range:
    """Share i of n of `count` items: the i-th of n contiguous, near-equal ranges."""
    index, parts = part
    size, extra = divmod(count, parts)
    start = index * size + min(index, extra)
    return range(start, start + size + (1 if index < extra else 0))


def merge_parts(shares: list[list[list[Completion | None]]]) -> list[list[Completion]]:
    """The whole result from every share's `generate_part` (shares may repeat: the ranks of
    one tensor-parallel group return the same one)."""
    merged = [list(group) for group in shares[0]]
    for other in shares[1:]:
        for group, theirs in zip(merged, other, strict=True):
            for index, completion in enumerate(theirs):
                if group[index] is None:
                    group[index] = completion
    missing = sum(c is None for group in merged for c in group)
    if missing:
        raise RuntimeError(f"data-parallel generation: {missing} completions in no share")
    return merged  # type: ignore[return-value]


def finish(token_ids: list[int], logprobs: list[float], eos_ids: set[int], max_new_tokens: int,
           tokenizer) -> Completion:
    """Cut a raw generated sequence after its first eos and classify how it ended."""
    for index, token in enumerate(token_ids):
        if token in eos_ids:
            token_ids, logprobs, reason = token_ids[: index + 1], logprobs[: index + 1], "stop"
            break
    else:
        token_ids, logprobs = token_ids[:max_new_tokens], logprobs[:max_new_tokens]
        reason = "length"
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    return Completion(list(token_ids), list(logprobs), text, reason)


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts, stable across Python runs (unlike hash()): the one seed
    derivation of rollout's prompt shuffle and sampling and of the engines' batches."""
    import hashlib  # here, not at the top: `dcpo --help` imports this module

    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def batch_seed(seed: int, rows: list[tuple[int, int]]) -> int:
    """A per-batch seed from the run seed and the batch's rows, so a batch's samples depend
    only on what is in it, not on how many batches ran before."""
    return derive_seed(seed, rows[0], len(rows))


def eos_token_ids(tokenizer, generation_config) -> set[int]:
    """The tokenizer's eos plus every eos id of the model's generation config."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return ids


def generation_config(model_path):
    """The model directory's generation config (its eos ids), or None without one."""
    from transformers import GenerationConfig  # here: `dcpo --help` imports this module

    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the tokenizer's eos alone
        return None
