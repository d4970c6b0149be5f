"""Packing: best-fit decreasing over the whole step, whole samples only, positions restarting per sample."""

from __future__ import annotations

import random

import pytest
import torch

from sftdist.data.batching import build_micro_batches, collate_packed, plan_packed
from sftdist.data.dataset import Sample


def test_packing_plan_matches_the_docstring_example():
    assert plan_packed([5, 4, 3, 2, 6], micro_batch_tokens=12) == [[4, 0], [1, 2, 3]]


@pytest.mark.parametrize("budget", [256, 1000, 4096])
def test_every_sample_once_within_the_budget_and_best_fit(budget):
    rng = random.Random(budget)
    lengths = [rng.randint(1, 256) for _ in range(300)]
    bins = plan_packed(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    # best fit leaves no two micro-batches that could have been merged into one
    fills = sorted(sum(lengths[i] for i in b) for b in bins)
    assert fills[0] + fills[1] > budget
    lower_bound = -(-sum(lengths) // budget)
    assert len(bins) <= 11 / 9 * lower_bound + 6 / 9  # the best-fit-decreasing guarantee (Johnson 1973)


def test_a_sample_over_the_budget_is_an_error():
    with pytest.raises(ValueError, match="exceeds train.micro_batch_tokens=8"):
        plan_packed([4, 9], 8)


def test_collate_packed_restarts_positions_and_shifts_targets_within_each_sample():
    a = Sample([1, 2, 3, 4], [-100, -100, 3, 4], {})
    b = Sample([5, 6, 7], [-100, 6, 7], {})
    mb = collate_packed([a, b], micro_batch_tokens=10)
    assert mb.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert mb.targets.tolist() == [[-100, 3, 4, -100, 6, 7, -100]]  # never from one sample into the next
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert mb.cu_seqlens.tolist() == [0, 4, 7] and mb.cu_seqlens.dtype == torch.int32 and mb.max_seqlen == 4
    assert (mb.num_tokens, mb.num_supervised, mb.num_slots) == (7, 4, 10) and mb.attention_mask is None


def test_packed_and_padded_steps_hold_the_same_tokens():
    rng = random.Random(0)
    samples = []
    for _ in range(40):
        n = rng.randint(2, 60)
        samples.append(Sample(list(range(n)), [-100] * (n // 2) + list(range(n // 2, n)), {}))
    packed = build_micro_batches(samples, 128, pad_id=0, packing=True)
    padded = build_micro_batches(samples, 128, pad_id=0, packing=False)
    assert sum(mb.num_tokens for mb in packed) == sum(mb.num_tokens for mb in padded)
    assert sum(mb.num_supervised for mb in packed) == sum(mb.num_supervised for mb in padded)
    assert len(packed) < len(padded)
