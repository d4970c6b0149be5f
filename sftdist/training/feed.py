"""What each step trains on: the step's samples (the sampler's pick, by seed and step alone) -> this rank's
micro-batches (the same number on every rank, balanced by training FLOPs), the next step's prepared while this one
trains."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from sftdist.config import SFTConfig
from sftdist.curriculum.sampler import CurriculumSampler
from sftdist.data.batching import MicroBatch, StepSampler, build_micro_batches, shard_packed
from sftdist.data.dataset import EncodedSet, Sample
from sftdist.parallel import Strategy


class StepFeeder:
    def __init__(
        self,
        train_set: EncodedSet,
        sampler: StepSampler | CurriculumSampler,
        cfg: SFTConfig,
        pad_id: int,
        strategy: Strategy,
        flops: Callable[[list[int]], float],
    ):
        self.train_set, self.sampler, self.cfg, self.pad_id = train_set, sampler, cfg, pad_id
        self.strategy, self.flops = strategy, flops

    def batches(self, samples: list[Sample]) -> list[MicroBatch]:
        """This rank's micro-batches of a step's samples: its share, or with context parallelism its group's share,
        each packed row cut to this rank's shard (sftdist.parallel.context)."""
        s = self.strategy
        if s.context_parallel == 1:
            return self._dealt(samples, s.rank, s.world_size)
        cp, rank = s.context_parallel, s.rank % s.context_parallel
        mine = self._dealt(samples, s.data_rank, s.data_size)
        return [shard_packed(mb, cp, rank, self.pad_id) if mb.num_tokens else mb for mb in mine]

    def _dealt(self, samples: list[Sample], rank: int, size: int) -> list[MicroBatch]:
        t = self.cfg.train
        return build_micro_batches(
            samples, t.micro_batch_tokens, self.pad_id, self.cfg.data.packing, rank, size, self.flops
        )

    def eval_batches(self, samples: list[Sample]) -> Iterator[MicroBatch]:
        """This rank's micro-batches of an eval set, a global batch of samples at a time (whole rows: eval runs
        without context parallelism)."""
        size, s = self.cfg.train.global_batch_size, self.strategy
        for start in range(0, len(samples), size):
            yield from self._dealt(samples[start : start + size], s.rank, s.world_size)

    def steps(self, start: int, stop: int) -> Iterator[tuple[int, list[Sample], list[MicroBatch]]]:
        """(step, its samples, this rank's micro-batches) for steps ``start`` to ``stop`` - 1. The next step's are
        read, collated and (for a GPU) pinned in a background thread while this one trains, so the loop never waits
        for them."""

        def inputs(step: int) -> tuple[list[Sample], list[MicroBatch]]:
            samples = [self.train_set[i] for i in self.sampler.indices(step)]
            batches = self.batches(samples)
            return samples, [mb.pin() for mb in batches] if self.strategy.device.type == "cuda" else batches

        with ThreadPoolExecutor(1, thread_name_prefix="sftdist-collate") as pool:
            upcoming = pool.submit(inputs, start)
            for step in range(start, stop):
                samples, micro_batches = upcoming.result()
                if step + 1 < stop:
                    upcoming = pool.submit(inputs, step + 1)
                yield step, samples, micro_batches
