"""Mini-batches keep prompt groups whole and reproducible; micro-batches respect the budget."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcpo_cli.core.batching import (
    collate,
    default_mini_batch_size,
    group_rows,
    micro_batches,
    mini_batches,
    shard,
)


def test_group_rows_keeps_first_appearance_order():
    assert group_rows(["b", "a", "b", "c", "a"]) == [[0, 2], [1, 4], [3]]


def test_default_mini_batch_size_gives_several_updates():
    assert default_mini_batch_size(512) == 128
    assert default_mini_batch_size(10) == 3  # 3 + 3 + 3 + 1 -> 4 updates
    assert default_mini_batch_size(1) == 1


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=20), size=st.integers(1, 8),
       seed=st.integers(0, 100), step=st.integers(0, 5), epoch=st.integers(0, 3))
def test_mini_batches_partition_whole_groups(sizes, size, seed, step, epoch):
    prompt_ids = [f"p{g}" for g, n in enumerate(sizes) for _ in range(n)]
    groups = group_rows(prompt_ids)
    batches = mini_batches(groups, size, seed, step, epoch)
    assert sorted(r for b in batches for r in b) == list(range(len(prompt_ids)))
    assert len(batches) == -(-len(groups) // size)
    for batch in batches:
        prompts = {prompt_ids[r] for r in batch}
        assert len(prompts) <= size
        # whole groups: every response of each prompt in this batch is in it
        assert all(prompt_ids.count(p) == sum(prompt_ids[r] == p for r in batch) for p in prompts)
    assert batches == mini_batches(groups, size, seed, step, epoch)  # reproducible


def test_mini_batch_order_depends_on_seed_step_and_epoch():
    groups = [[i] for i in range(30)]
    base = mini_batches(groups, 30, 0, 1, 0)
    assert mini_batches(groups, 30, 0, 1, 1) != base
    assert mini_batches(groups, 30, 0, 2, 0) != base
    assert mini_batches(groups, 30, 1, 1, 0) != base


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=40), budget=st.integers(1, 300))
def test_micro_batches_fit_the_budget(lengths, budget):
    rows = list(range(len(lengths)))
    batches = micro_batches(rows, lengths, budget)
    assert sorted(r for b in batches for r in b) == rows
    for batch in batches:
        padded = len(batch) * max(lengths[r] for r in batch)
        assert padded <= budget or len(batch) == 1
    # longest first: lengths never increase across the sequence of micro-batches
    flat = [lengths[r] for b in batches for r in b]
    assert flat == sorted(flat, reverse=True)


def test_micro_batches_group_similar_lengths():
    lengths = [10, 100, 11, 99, 12, 98]
    assert micro_batches(list(range(6)), lengths, 300) == [[1, 3, 5], [4, 2, 0]]


def test_shard_splits_round_robin():
    assert shard([1, 2, 3, 4, 5], 0, 2) == [1, 3, 5]
    assert shard([1, 2, 3, 4, 5], 1, 2) == [2, 4]
    assert shard([1, 2, 3]) == [1, 2, 3]


def test_collate_aligns_predictions_with_response_tokens():
    prompts = [[5, 6, 7], [8]]
    responses = [[1, 2], [3, 4, 9]]
    batch = collate([0, 1], prompts, responses, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # the token after each predicting position is the target, in row-major order
    following = batch.input_ids[:, 1:][batch.predict_mask[:, :-1]]
    assert following.tolist() == batch.targets.tolist() == [1, 2, 3, 4, 9]
    assert batch.response_mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch.num_tokens == 9
    assert int(batch.predict_mask.sum()) == int(batch.response_mask.sum())
    padded = torch.zeros(batch.response_mask.shape, dtype=torch.long)
    padded[batch.response_mask] = batch.targets
    assert padded.tolist() == [[1, 2, 0], [3, 4, 9]]


@given(st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=6), min_size=1, max_size=5),
       st.integers(1, 8))
def test_spread_keeps_rows_and_order_and_gives_each_process_rows(parts, count):
    from dcpo_cli.core.batching import spread

    out = spread(parts, count)
    assert [r for p in out for r in p] == [r for p in parts for r in p]
    assert all(out)
    rows = sum(len(p) for p in parts)
    assert len(out) >= min(count, rows)
    if count == 1:
        assert out == parts
