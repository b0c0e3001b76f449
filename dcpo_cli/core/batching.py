"""How a step's responses are cut up: mini-batches of whole prompt groups (one optimizer
update each) and micro-batches under a token budget (one forward/backward each).

Pure list arithmetic plus one collate function, so the splitting rules can be tested alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


def group_rows(prompt_ids: list[str]) -> list[list[int]]:
    """Row indices of each prompt's responses, groups in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for row, prompt_id in enumerate(prompt_ids):
        groups.setdefault(prompt_id, []).append(row)
    return list(groups.values())


def default_mini_batch_size(num_groups: int, updates: int = 4) -> int:
    """Prompts per mini-batch giving `updates` optimizer updates per epoch (as the paper's
    512 prompts split into mini-batches), at least one prompt each."""
    return max(1, -(-num_groups // updates))


def mini_batches(groups: list[list[int]], size: int, seed: int, step: int,
                 epoch: int) -> list[list[int]]:
    """Shuffle the groups with a generator seeded by (seed, step, epoch), so a re-run draws
    the same order, and cut them into mini-batches of `size` whole groups."""
    if size < 1:
        raise ValueError("mini-batch size must be at least 1")
    order = list(range(len(groups)))
    random.Random(f"dcpo-shuffle/{seed}/{step}/{epoch}").shuffle(order)
    batches = []
    for start in range(0, len(order), size):
        batches.append([row for g in order[start:start + size] for row in groups[g]])
    return batches


def pack_greedy(items: list[int], sizes: list[int], budget: int, extra: int = 0
                ) -> list[list[int]]:
    """Cut `items`, in the given order, into consecutive batches whose padded size
    (count x (largest size + extra)) stays within `budget`; an item that alone exceeds it
    goes alone. `sizes` is indexed by item. The one packer of micro-batches (train-step)
    and generation batches (the hf engine)."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for item in items:
        longest_if_added = max(longest, sizes[item])
        if current and (len(current) + 1) * (longest_if_added + extra) > budget:
            batches.append(current)
            current, longest_if_added = [], sizes[item]
        current.append(item)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def micro_batches(rows: list[int], lengths: list[int], token_budget: int) -> list[list[int]]:
    """Split `rows` into micro-batches whose padded size (count x longest) stays within
    `token_budget`; rows are taken longest first, so each micro-batch holds similar lengths
    and little compute goes to padding. A row longer than the budget goes alone."""
    return pack_greedy(sorted(rows, key=lambda r: (-lengths[r], r)), lengths, token_budget)


def shard(items: list, rank: int = 0, world_size: int = 1) -> list:
    """This rank's share of a list of micro-batches: the one place data is split across
    processes (every rank gets every `world_size`-th item; a single process gets all).

    Under torchrun the loss normalizers stay global (the whole mini-batch's responses and
    tokens), so gradients are summed across ranks, not averaged (fsdp.py), and every rank
    computes the old log-probs of its own rows."""
    return items[rank::world_size]


def spread(parts: list[list[int]], count: int) -> list[list[int]]:
    """At least `count` micro-batches where the rows allow it: halve the micro-batch with
    the most rows until there are enough, so that every process gets rows to train on. The
    order of rows is kept; one process (`count` 1) gets `parts` unchanged."""
    parts = [list(p) for p in parts]
    while len(parts) < count:
        index = max(range(len(parts)), key=lambda i: len(parts[i]))
        part = parts[index]
        if len(part) < 2:
            break
        half = len(part) // 2
        parts[index:index + 1] = [part[:half], part[half:]]
    return parts


@dataclass
class MicroBatch:
    """Right-padded prompt+response sequences.

    `input_ids`/`attention_mask` [B, T]; `predict_mask` [B, T] marks the positions whose
    next-token prediction is a response token; `targets` [R] are those response tokens, in
    row-major order (response by response), `response_mask` [B, Lmax] lays the same R tokens
    out per response, and `rows` maps batch entries back to table rows.
    """

    rows: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    predict_mask: torch.Tensor
    targets: torch.Tensor
    response_mask: torch.Tensor
    dummy: bool = False  # a zero-weighted pass of a process with no rows left (torchrun)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> MicroBatch:
        return MicroBatch(self.rows, *(t.to(device) for t in (
            self.input_ids, self.attention_mask, self.predict_mask, self.targets,
            self.response_mask)), dummy=self.dummy)


def collate(rows: list[int], prompt_tokens: list[list[int]], response_tokens: list[list[int]],
            pad_id: int) -> MicroBatch:
    """Build the padded tensors of one micro-batch from the rows' token lists."""
    seqs = [prompt_tokens[r] + response_tokens[r] for r in rows]
    width = max(len(s) for s in seqs)
    longest_response = max(len(response_tokens[r]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    predict_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    response_mask = torch.zeros((len(rows), longest_response), dtype=torch.bool)
    targets = []
    for i, row in enumerate(rows):
        prompt, response = prompt_tokens[row], response_tokens[row]
        input_ids[i, :len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
        attention_mask[i, :len(seqs[i])] = 1
        # Position p predicts token p + 1: the last prompt token predicts the first response one.
        predict_mask[i, len(prompt) - 1:len(seqs[i]) - 1] = True
        response_mask[i, :len(response)] = True
        targets.extend(response)
    return MicroBatch(rows, input_ids, attention_mask, predict_mask,
                      torch.tensor(targets, dtype=torch.long), response_mask)
