"""The wire format of `dcpo serve` (JSON over HTTP), shared by the server and its client
engine (`engines/serve_client.py`), so both read and write the same fields.

Endpoints:
- `GET /health`: the server's identity (`identity` below): dcpo version, protocol, engine
  name and settings, the served model (as given, its directory, Hub id / revision / commit)
  and its fingerprint (`files.model_source.model_identity`, the one rollout records; null
  while a failed load leaves it serving no weights it can name), the vocabulary fingerprint
  (tokenizer + eos ids) that decides what it can load in place, the number of weight loads,
  and its `limits` (vocab_size, context_length, max_responses, max_request_tokens,
  request_timeout);
- `POST /generate` `{"prompt_token_ids": [[int]], "settings": SamplingSettings fields,
  "fingerprint": the weights the caller asked for}`: checked whole first (every token id in
  the vocabulary, prompt + max_new_tokens within the context, the size limits, the
  fingerprint the served one: else an error status below, nothing generated), then a stream
  of JSON lines (`application/x-ndjson`): `{"progress": [responses, tokens]}` and
  `{"wait": true}` heartbeats, then `{"completions": [[Completion fields]], "fingerprint":
  ...}` (the weights they were generated with, checked under the engine lock) or
  `{"error": ..., "code": ...}` (code `other_weights`: another client switched the weights
  while this request waited; `timeout`; `stopping`; none: the engine failed);
- `POST /load-weights` `{"model": ModelSource fields (an absolute path), "fingerprint":
  ...}`: replace the served weights in place with a model directory's (the server reads it
  from its own file system and checks that it sees the same fingerprint), answered with the
  identity; check-then-commit: refused, it changes nothing.

Every error reply is `{"error": "one line"}` (`"code"` too for 409) with an HTTP status:
400 a malformed request or a value out of range for the served model; 401 a missing or
wrong token; 404 no such endpoint; 409 a request the served model cannot serve as asked
(`code`: `other_weights`: load yours and ask again; `other_model`, `other_vocabulary`,
`conflict`: it never will); 413 beyond the server's size limits; 422 weights the server
cannot read or that do not fit the model; 503 the server is stopping; 500 the engine
failed. With a token, every request carries `Authorization: Bearer TOKEN`. Floats travel
as Python's `repr` (json), which reads back to the same double, so log-probs cross the wire
exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, fields
from typing import Any

from dcpo_cli.engines.base import Completion, SamplingSettings

PROTOCOL = 1
# Below this a temperature overflows the scaled logits (vLLM samples greedily below 1e-5)
MIN_TEMPERATURE = 1e-5
FINISH_REASONS = ("stop", "length")


class ProtocolError(ValueError):
    """A message that does not follow this format (the text says which field)."""


def settings_to_json(settings: SamplingSettings) -> dict[str, Any]:
    return asdict(settings)


def settings_from_json(data: Any) -> SamplingSettings:
    if not isinstance(data, dict):
        raise ProtocolError("settings: expected an object")
    names = {f.name: f.type for f in fields(SamplingSettings)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ProtocolError(f"settings: unknown field {unknown[0]!r}")
    values = {}
    for name, value in data.items():
        if name in ("n", "top_k", "max_new_tokens", "seed"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ProtocolError(f"settings.{name}: expected an integer")
        elif not isinstance(value, int | float) or isinstance(value, bool) \
                or not math.isfinite(value):
            raise ProtocolError(f"settings.{name}: expected a finite number")
        values[name] = value
    settings = SamplingSettings(**values)
    for name, failed, expected in (
        ("n", settings.n < 1, ">= 1"),
        ("max_new_tokens", settings.max_new_tokens < 1, ">= 1"),
        ("temperature", not (settings.temperature == 0 or
                             settings.temperature >= MIN_TEMPERATURE), f"0 (greedy) or >= "
         f"{MIN_TEMPERATURE:g}"),
        ("top_p", not 0 < settings.top_p <= 1, "in (0, 1]"),
        ("top_k", settings.top_k < 0, ">= 0 (0: no top-k filter)"),
        ("seed", not -(1 << 63) <= settings.seed < 1 << 63, "a 64-bit integer"),
    ):
        if failed:
            raise ProtocolError(f"settings.{name} {getattr(settings, name)!r}: expected "
                                f"{expected}")
    return settings


def prompts_from_json(data: Any) -> list[list[int]]:
    if not isinstance(data, list) or not data:
        raise ProtocolError("prompt_token_ids: expected a non-empty list of token id lists")
    for ids in data:
        if not isinstance(ids, list) or not ids or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ProtocolError("prompt_token_ids: every prompt must be a non-empty list of "
                                "token ids >= 0")
    return data


def completion_to_json(completion: Completion) -> dict[str, Any]:
    return {"token_ids": list(completion.token_ids), "logprobs": list(completion.logprobs),
            "text": completion.text, "finish_reason": completion.finish_reason}


def completion_from_json(data: Any, settings: SamplingSettings,
                         vocab_size: int) -> Completion:
    """A Completion, checked against what was asked for (`settings`) and the vocabulary."""
    if not isinstance(data, dict) or set(data) != {"token_ids", "logprobs", "text",
                                                    "finish_reason"}:
        raise ProtocolError("a completion must have exactly token_ids, logprobs, text and "
                            "finish_reason")
    ids, logprobs, text, reason = (data["token_ids"], data["logprobs"], data["text"],
                                   data["finish_reason"])
    if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in ids):
        raise ProtocolError(f"token_ids: expected token ids in [0, {vocab_size})")
    if not 1 <= len(ids) <= settings.max_new_tokens:
        raise ProtocolError(f"token_ids: {len(ids)} tokens, expected 1 to "
                            f"{settings.max_new_tokens}")
    if not isinstance(logprobs, list) or len(logprobs) != len(ids) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)
            and v <= 1e-6 for v in logprobs):
        raise ProtocolError("logprobs: expected one log-probability (<= 0) per token")
    if not isinstance(text, str):
        raise ProtocolError("text: expected a string")
    if reason not in FINISH_REASONS:
        raise ProtocolError(f"finish_reason: expected one of {', '.join(FINISH_REASONS)}")
    return Completion(ids, [float(v) for v in logprobs], text, reason)


def completions_from_json(data: Any, settings: SamplingSettings, prompts: int,
                          vocab_size: int) -> list[list[Completion]]:
    if not isinstance(data, list) or len(data) != prompts:
        raise ProtocolError(f"completions: expected {prompts} groups, one per prompt")
    if not all(isinstance(group, list) and len(group) == settings.n for group in data):
        raise ProtocolError(f"completions: expected {settings.n} per prompt")
    return [[completion_from_json(c, settings, vocab_size) for c in group] for group in data]


def vocabulary_fingerprint(tokenizer: Any, eos_ids: set[int]) -> str:
    """sha256 of what an in-place weight load cannot change and generation depends on: the
    token <-> id map (special and added tokens included) and the ids that end a response."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    record = {"vocab": vocab, "eos": sorted(eos_ids), "size": len(tokenizer)}
    return hashlib.sha256(json.dumps(record, ensure_ascii=False).encode()).hexdigest()


def vocabulary_size(tokenizer: Any) -> int:
    """One past the largest id the tokenizer knows (completions are checked against it)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()
