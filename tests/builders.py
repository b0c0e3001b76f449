"""Shared test builders: stage files written by hand, so a test of one stage does not need
the stages before it. (Models come from conftest's fixtures and `dcpo_cli.tiny.model`.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch

from dcpo_cli.files import contracts


def write_rollouts(path, responses, answers, lengths=None, step=3, start=0, max_new_tokens=16,
                   options=None):
    """A rollouts file as `dcpo rollout` writes it (token ids are placeholders of the
    given lengths; `options`: the rollout options its metadata records)."""
    count = len(responses)
    lengths = lengths or [4] * count
    columns = {
        "step": [step] * count,
        "prompt_id": [f"p{(start + i) // 2}" for i in range(count)],
        "sample_index": [(start + i) % 2 for i in range(count)],
        "prompt_text": ["q"] * count,
        "prompt_token_ids": [[1, 2]] * count,
        "response_text": responses,
        "response_token_ids": [list(range(n)) for n in lengths],
        "response_logprobs": [[-0.5] * n for n in lengths],
        "finish_reason": ["length" if n >= max_new_tokens else "stop" for n in lengths],
        "answer": answers,
    }
    schema = pa.schema(list(contracts.ROLLOUT_COLUMNS.items()))
    meta = contracts.make_metadata("rollouts", "rollout", step=step, options=options,
                               extra={"max_new_tokens": max_new_tokens})
    contracts.write_table(pa.table(columns, schema=schema), path, meta)
    return path


def write_scored(path: Path, tokenizer, step: int, rewards: dict[str, list[float]],
                 seed: int = 0, max_len: int = 12, vocab: int | None = None,
                 max_new_tokens: int | None = None, round_index: int = 0) -> Path:
    """A scored file made by hand: random responses ending in eos, rewards as given."""
    gen = torch.Generator().manual_seed(seed + 1000 * step)
    vocab = vocab or len(tokenizer)
    rows: dict[str, list] = {name: [] for name in contracts.SCORED_COLUMNS}
    for prompt_id, group in rewards.items():
        text = f"<|im_start|>user\nWhat is {prompt_id}?<|im_end|>\n<|im_start|>assistant\n"
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for index, reward in enumerate(group):
            length = int(torch.randint(2, max_len, (1,), generator=gen))
            body = torch.randint(5, vocab, (length,), generator=gen).tolist()
            truncated = index == 0
            response = body if truncated else body + [tokenizer.eos_token_id]
            values = dict(step=step, prompt_id=prompt_id, sample_index=index, prompt_text=text,
                          prompt_token_ids=prompt_ids, response_text=tokenizer.decode(response),
                          response_token_ids=response,
                          response_logprobs=[-1.0] * len(response),
                          finish_reason="length" if truncated else "stop", answer="1",
                          reward=float(reward), correct=bool(reward > 0),
                          extracted_answer="1" if reward else "0")
            for name, value in values.items():
                rows[name].append(value)
    schema = pa.schema([(n, t) for n, t in contracts.SCORED_COLUMNS.items()])
    contracts.write_table(pa.table(rows, schema=schema), path,
                      contracts.make_metadata("scored", "score", step=step,
                                          extra={"max_new_tokens": max_new_tokens,
                                                 "round": round_index}))
    return path
