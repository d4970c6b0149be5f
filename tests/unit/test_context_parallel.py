"""Context parallelism's sharding of a packed row (sftdist.data.batching.shard_plan / shard_packed), on the host."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import compose
from sftdist.data.batching import collate_packed, shard_packed, shard_plan
from sftdist.data.dataset import Sample
from sftdist.parallel import check_world_size


@pytest.mark.parametrize("cp", [2, 4])
def test_every_position_is_on_one_rank_and_each_holds_early_and_late_tokens_alike(cp):
    lengths = [5, 11, 3, 8, 1]
    padded, index = shard_plan(lengths, cp)
    assert all(p % (2 * cp) == 0 and p - 2 * cp < n <= p for p, n in zip(padded, lengths))
    held = np.concatenate(index)
    assert sorted(held.tolist()) == list(range(sum(padded))) and len({len(i) for i in index}) == 1
    start = 0
    for n in padded:  # within each sample, rank r holds chunk r and chunk 2cp-1-r: the same causal work each
        work = [int(sum(p - start + 1 for p in i if start <= p < start + n)) for i in index]
        assert len(set(work)) == 1, work
        start += n


def test_the_shards_of_a_row_hold_its_tokens_targets_and_positions_once():
    samples = [Sample(list(range(10, 10 + n)), [-100] * 2 + list(range(10 + 2, 10 + n)), {}) for n in (5, 11, 3)]
    mb = collate_packed(samples, micro_batch_tokens=64)
    shards = [shard_packed(mb, 2, r, pad_id=0) for r in range(2)]
    assert sum(s.num_tokens for s in shards) == mb.num_tokens
    assert sum(s.num_supervised for s in shards) == mb.num_supervised
    whole = torch.zeros(int(shards[0].context.gathered.numel()), dtype=torch.long)
    targets, positions = whole.clone(), whole.clone()
    for s in shards:
        whole[s.context.local], targets[s.context.local] = s.input_ids[0], s.targets[0]
        positions[s.context.local] = s.position_ids[0]
    real = whole != 0
    assert whole[real].tolist() == mb.input_ids[0].tolist() and targets[real].tolist() == mb.targets[0].tolist()
    assert positions[real].tolist() == mb.position_ids[0].tolist()  # (and the pads' positions go on counting)
    assert (targets[~real] == -100).all() and shards[0].cu_seqlens.tolist() == [0, 8, 20, 24]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["strategy.context_parallel=2"], "strategy.context_parallel=2 needs several processes"),
        (["strategy=ddp", "strategy.context_parallel=2", "data.packing=false"], "it needs data.packing=true"),
        (
            ["strategy=ddp", "strategy.context_parallel=2", "model.attn_impl=flash_attn"],
            "model.attn_impl='flash_attn' has no context-parallel form yet",
        ),
        (["strategy.context_parallel=0"], "strategy.context_parallel=0 must be > 0"),
    ],
)
def test_configurations_context_parallelism_cannot_train_are_refused_naming_the_key(overrides, message):
    from sftdist.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        compose(*overrides)


def test_context_parallel_must_divide_the_world():
    from sftdist.errors import ConfigError

    cfg = compose("strategy=ddp", "strategy.context_parallel=4", "train.global_batch_size=12")
    with pytest.raises(ConfigError, match="strategy.context_parallel=4 does not divide the 6 processes"):
        check_world_size(cfg, 6)
    check_world_size(cfg, 4)
