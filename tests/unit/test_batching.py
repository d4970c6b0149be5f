"""The step's samples come from (seed, step) alone; micro-batches respect the budget and lose nothing."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from sftdist.data.batching import StepSampler, build_micro_batches, collate_padded, plan_padded
from sftdist.data.dataset import Sample


def test_sampler_is_a_pure_function_of_seed_and_step():
    a, b = StepSampler(10, 4, seed=1), StepSampler(10, 4, seed=1)
    assert [a.indices(s) for s in range(6)] == [b.indices(s) for s in reversed(range(6))][::-1]
    assert StepSampler(10, 4, seed=2).indices(0) != a.indices(0)


def test_sampler_visits_every_sample_once_per_epoch():
    sampler = StepSampler(12, 4, seed=0)
    for epoch in range(3):
        seen = [i for step in range(3 * epoch, 3 * epoch + 3) for i in sampler.indices(step)]
        assert sorted(seen) == list(range(12))
    assert sampler.indices(0) != sampler.indices(3)  # each epoch a fresh permutation


def test_sampler_crosses_epoch_boundaries_without_dropping():
    sampler = StepSampler(5, 3, seed=0)
    stream = [i for step in range(5) for i in sampler.indices(step)]  # 15 = 3 epochs of 5
    assert Counter(stream) == {i: 3 for i in range(5)}
    assert sampler.epoch(4) == 3.0


def test_padded_plan_matches_the_docstring_example():
    assert plan_padded([3, 5, 2, 4], micro_batch_tokens=12) == [[1, 3], [0, 2]]


@pytest.mark.parametrize("budget", [170, 512, 4096])
def test_padded_plan_respects_the_budget_and_keeps_every_sample(budget):
    lengths = [(i * 37) % 160 + 10 for i in range(50)]
    groups = plan_padded(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(50))
    assert all(len(g) * max(lengths[i] for i in g) <= budget for g in groups)


def test_a_sample_over_the_budget_is_an_error():
    with pytest.raises(ValueError, match="exceeds train.micro_batch_tokens=8"):
        plan_padded([4, 9], 8)


def test_collate_shifts_targets_within_each_sample_and_masks_padding():
    a = Sample([1, 2, 3, 4], [-100, -100, 3, 4], {})
    b = Sample([5, 6], [-100, 6], {})
    mb = collate_padded([a, b], pad_id=0)
    assert mb.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 0, 0]]
    assert mb.targets.tolist() == [[-100, 3, 4, -100], [6, -100, -100, -100]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert (mb.num_tokens, mb.num_supervised, mb.num_slots) == (6, 3, 8)
    assert a.num_supervised + b.num_supervised == mb.num_supervised


def test_micro_batches_of_a_step_hold_all_its_tokens():
    samples = [Sample(list(range(n)), [-100] + list(range(1, n)), {}) for n in (7, 3, 9, 4, 4)]
    mbs = build_micro_batches(samples, micro_batch_tokens=12, pad_id=0)
    assert sum(mb.num_tokens for mb in mbs) == 27
    assert sum(mb.num_supervised for mb in mbs) == sum(s.num_supervised for s in samples)
    assert all(mb.num_slots <= 12 and mb.input_ids.dtype == torch.long for mb in mbs)


def test_a_micro_batch_knows_its_supervised_positions_from_the_host_and_keeps_them_on_copies():
    samples = [Sample([1, 2, 3, 4], [-100, -100, 3, 4], {}), Sample([5, 6], [-100, 6], {})]
    for packing in (True, False):
        (mb,) = build_micro_batches(samples, 16, 0, packing)
        flat = mb.targets.flatten()
        assert flat[mb.supervised_index].tolist() == [3, 4, 6] and int((flat != -100).sum()) == mb.num_supervised
        moved = mb.to("cpu")
        for name in mb.__dataclass_fields__:
            a, b = getattr(mb, name), getattr(moved, name)
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name
