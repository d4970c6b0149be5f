"""From the sample stream to the micro-batches of one optimizer step.

A step takes ``global_batch_size`` samples from a stream that is a pure function of the seed (each
epoch a fresh permutation), so the samples of step ``n`` never depend on the world size or on the
token budget. Those samples are then cut into micro-batches of at most ``micro_batch_tokens`` tokens;
the number of micro-batches (gradient accumulation) follows from the data.

Packed micro-batches (``data.packing=true``): best-fit decreasing over the whole step, each micro-batch one
row of whole samples, budget 12 tokens, lengths 5, 4, 3, 2, 6::

    micro-batch 0: [e e e e e e a a a a a .]   6 + 5 = 11 <= 12 (a fits best after e)
    position_ids:  [0 1 2 3 4 5 0 1 2 3 4]     restart at each sample
    cu_seqlens:    [0, 6, 11]                  sample boundaries, for the attention backend
    micro-batch 1: [b b b b c c c d d]         4 + 3 + 2 = 9

Padded micro-batches (``data.packing=false``), longest first, budget 12 tokens, lengths 5, 4, 3, 2::

    micro-batch 0: [a a a a a]      rows 2 x 5 = 10 slots <= 12
                   [b b b b .]
    micro-batch 1: [c c c]          rows 2 x 3 = 6 slots
                   [d d .]

Targets are shifted per sample before batching (``targets[t] = labels[t + 1]``, the last is -100), so
no target ever crosses from one sample into another, padded or packed.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sftdist.data.dataset import Sample
from sftdist.data.template import IGNORE_INDEX


class StepSampler:
    """Global batches of sample indices, a pure function of (seed, step)."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int):
        if num_samples <= 0:
            raise ValueError("the training set is empty")
        self.num_samples, self.global_batch_size, self.seed = num_samples, global_batch_size, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, 2, epoch]).permutation(self.num_samples)
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        """Sample indices of 0-based optimizer step ``step``."""
        start = step * self.global_batch_size
        return [
            int(self._perm(p // self.num_samples)[p % self.num_samples])
            for p in range(start, start + self.global_batch_size)
        ]

    def epoch(self, step: int) -> float:
        """Epochs completed after 0-based step ``step``."""
        return (step + 1) * self.global_batch_size / self.num_samples


def plan_padded(lengths: list[int], micro_batch_tokens: int) -> list[list[int]]:
    """Group positions into padded micro-batches of at most ``micro_batch_tokens`` slots, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if lengths[i] > micro_batch_tokens:
            raise ValueError(f"a sample of {lengths[i]} tokens exceeds train.micro_batch_tokens={micro_batch_tokens}")
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= micro_batch_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def plan_packed(lengths: list[int], micro_batch_tokens: int) -> list[list[int]]:
    """Best-fit decreasing: each sample, longest first, goes to the micro-batch it fills best (the least room
    left that still fits it; ties to the older one), else opens a new one. Never splits a sample."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, bin index), kept sorted
    for i in order:
        if lengths[i] > micro_batch_tokens:
            raise ValueError(f"a sample of {lengths[i]} tokens exceeds train.micro_batch_tokens={micro_batch_tokens}")
        k = bisect.bisect_left(room, (lengths[i], -1))
        if k == len(room):
            bins.append([i])
            left, b = micro_batch_tokens - lengths[i], len(bins) - 1
        else:
            left, b = room.pop(k)
            bins[b].append(i)
            left -= lengths[i]
        bisect.insort(room, (left, b))
    return bins


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (R, L) long; packed: R = 1
    targets: torch.Tensor  # (R, L) long, next-token targets, -100 where not supervised
    attention_mask: torch.Tensor | None  # (R, L) long, 1 on real tokens; None when packed
    num_tokens: int  # real (non-pad) tokens
    num_supervised: int  # targets != -100
    num_slots: int  # padded: R * L; packed: the micro-batch token budget it fills
    position_ids: torch.Tensor | None = None  # (1, L) packed: restarting at each sample
    cu_seqlens: torch.Tensor | None = None  # (N + 1,) int32 packed: sample boundaries
    max_seqlen: int = 0  # packed: the longest sample
    # Flat positions (into targets.flatten()) of the supervised targets: found on the host, where the targets are
    # made, so that selecting them on a device never waits for it (sftdist.training.loss).
    supervised_index: torch.Tensor | None = None
    context: ContextShard | None = None  # context parallelism: this rank's shard of the row (shard_packed)

    def __post_init__(self) -> None:
        if self.supervised_index is None:
            self.supervised_index = (self.targets.flatten() != IGNORE_INDEX).nonzero()[:, 0]

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def num_padding(self) -> int:
        """Positions holding padding: none in a packed row (whole samples end to end), but for the pads that make a
        row's samples shard evenly under context parallelism."""
        return self.input_ids.numel() - self.num_tokens

    def pin(self) -> MicroBatch:
        """The same micro-batch in page-locked host memory, so that :meth:`to` a GPU copies asynchronously."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str) -> MicroBatch:
        """On ``device``; the copies do not block the host when the batch is pinned (:meth:`pin`)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def _map(self, move: Callable[[torch.Tensor], torch.Tensor]) -> MicroBatch:
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        moved = {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
        if self.context is not None:
            moved["context"] = ContextShard(move(self.context.local), move(self.context.gathered))
        return MicroBatch(**moved)


def shard_plan(lengths: list[int], cp: int) -> tuple[list[int], list[np.ndarray]]:
    """Context parallelism (sftdist.parallel.context): (each sample's length padded to a multiple of 2 * cp, each
    rank's positions in the padded row). Rank r holds chunk r and chunk 2 * cp - 1 - r of every sample (of 2 * cp):
    early and late tokens alike, so that the causal attention's work is shared evenly."""
    padded = [-(-n // (2 * cp)) * 2 * cp for n in lengths]
    starts = np.concatenate(([0], np.cumsum(padded)[:-1])).astype(np.int64)
    mine: list[list[np.ndarray]] = [[] for _ in range(cp)]
    for start, n in zip(starts.tolist(), padded):
        chunk = n // (2 * cp)
        for r in range(cp):
            for c in (r, 2 * cp - 1 - r):
                mine[r].append(np.arange(start + c * chunk, start + (c + 1) * chunk, dtype=np.int64))
    return padded, [np.concatenate(m) for m in mine]


@dataclass
class ContextShard:
    """A rank's shard of a packed row, for its attention: ``local``, its positions in the padded row; ``gathered``, the
    padded row's positions in the order the group's all-gather lays them out (rank after rank)."""

    local: torch.Tensor
    gathered: torch.Tensor


def shard_packed(mb: MicroBatch, cp: int, rank: int, pad_id: int) -> MicroBatch:
    """Rank ``rank``'s shard of packed ``mb`` under context parallelism over ``cp`` ranks (:func:`shard_plan`): each
    sample padded at its end with unsupervised tokens (their positions go on counting), then sharded, the targets
    (already shifted within each sample) and the position ids by the same index."""
    lengths = (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).tolist()
    padded, index = shard_plan(lengths, cp)
    total = sum(padded)
    starts = np.concatenate(([0], np.cumsum(padded)[:-1])).astype(np.int64)
    real = torch.from_numpy(np.concatenate([s + np.arange(n) for s, n in zip(starts.tolist(), lengths)]))
    input_ids = torch.full((total,), pad_id, dtype=torch.long)
    targets = torch.full((total,), IGNORE_INDEX, dtype=torch.long)
    input_ids[real], targets[real] = mb.input_ids[0], mb.targets[0]
    positions = torch.cat([torch.arange(n) for n in padded])
    is_real = torch.zeros(total, dtype=torch.bool)
    is_real[real] = True
    local = torch.from_numpy(index[rank])
    return MicroBatch(
        input_ids[local][None],
        targets[local][None],
        None,
        num_tokens=int(is_real[local].sum()),
        num_supervised=int((targets[local] != IGNORE_INDEX).sum()),
        num_slots=mb.num_slots // cp,
        position_ids=positions[local][None],
        cu_seqlens=torch.tensor([0, *np.cumsum(padded).tolist()], dtype=torch.int32),
        max_seqlen=max(padded),
        context=ContextShard(local, torch.from_numpy(np.concatenate(index))),
    )


def collate_packed(samples: list[Sample], micro_batch_tokens: int) -> MicroBatch:
    """One row of whole samples; targets shifted within each sample, positions restarting at each."""
    lengths = [len(s.input_ids) for s in samples]
    input_ids = torch.tensor([t for s in samples for t in s.input_ids], dtype=torch.long)[None]
    targets = torch.tensor([t for s in samples for t in [*s.labels[1:], IGNORE_INDEX]], dtype=torch.long)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu_seqlens = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    return MicroBatch(
        input_ids,
        targets,
        None,
        num_tokens=input_ids.numel(),
        num_supervised=int((targets != IGNORE_INDEX).sum()),
        num_slots=micro_batch_tokens,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=max(lengths),
    )


def collate_padded(samples: list[Sample], pad_id: int) -> MicroBatch:
    """Right-padded rows; targets are shifted within each sample."""
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids)
        targets[row, : n - 1] = torch.tensor(s.labels[1:])
        attention_mask[row, :n] = 1
    return MicroBatch(
        input_ids,
        targets,
        attention_mask,
        num_tokens=int(attention_mask.sum()),
        num_supervised=int((targets != IGNORE_INDEX).sum()),
        num_slots=input_ids.numel(),
    )


def empty_micro_batch(pad_id: int, packed: bool) -> MicroBatch:
    """A one-token micro-batch with nothing to learn: it runs the forward and backward a rank with no work
    left must still run, so that every rank joins the same collectives (FSDP2's and ZeRO-3's gathers, DDP's
    all-reduce); its loss and gradients are exactly zero."""
    input_ids = torch.full((1, 1), pad_id, dtype=torch.long)
    targets = torch.full((1, 1), IGNORE_INDEX, dtype=torch.long)
    if packed:
        return MicroBatch(
            input_ids,
            targets,
            None,
            num_tokens=0,
            num_supervised=0,
            num_slots=0,
            position_ids=torch.zeros((1, 1), dtype=torch.long),
            cu_seqlens=torch.tensor([0, 1], dtype=torch.int32),
            max_seqlen=1,
        )
    return MicroBatch(
        input_ids, targets, torch.ones((1, 1), dtype=torch.long), num_tokens=0, num_supervised=0, num_slots=0
    )


def assign_to_ranks(costs: list[float], world_size: int) -> list[list[int]]:
    """Micro-batches (by index) for each rank: as even a count as possible (every rank runs
    ceil(n / world_size) micro-steps, the short ones padded with empty micro-batches), and within that the
    costliest first to the least loaded rank (longest-processing-time), so the ranks' work is balanced."""
    cap = -(-len(costs) // world_size)
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0.0] * world_size
    for g in sorted(range(len(costs)), key=lambda g: (-costs[g], g)):
        r = min((r for r in range(world_size) if len(ranks[r]) < cap), key=lambda r: (loads[r], r))
        ranks[r].append(g)
        loads[r] += costs[g]
    return ranks


def token_cost(lengths: list[int]) -> float:
    """Default cost of a micro-batch of samples of these lengths: its tokens."""
    return float(sum(lengths))


def build_micro_batches(
    samples: list[Sample],
    micro_batch_tokens: int,
    pad_id: int,
    packing: bool = False,
    rank: int = 0,
    world_size: int = 1,
    cost: Callable[[list[int]], float] = token_cost,
) -> list[MicroBatch]:
    """This rank's micro-batches of one optimizer step.

    The whole step is planned on every rank alike (packed: best-fit decreasing; padded: longest first), the
    micro-batches are dealt to the ranks by ``cost`` (:func:`assign_to_ranks`), and a rank with fewer than
    the others gets empty ones: every rank returns the same number of micro-batches.
    """
    lengths = [len(s.input_ids) for s in samples]
    groups = plan_packed(lengths, micro_batch_tokens) if packing else plan_padded(lengths, micro_batch_tokens)
    if world_size == 1:
        mine = groups
    else:
        dealt = assign_to_ranks([cost([lengths[i] for i in g]) for g in groups], world_size)
        mine = [groups[g] for g in dealt[rank]]
    if packing:
        out = [collate_packed([samples[i] for i in group], micro_batch_tokens) for group in mine]
    else:
        out = [collate_padded([samples[i] for i in group], pad_id) for group in mine]
    steps = -(-len(groups) // world_size)
    return out + [empty_micro_batch(pad_id, packing) for _ in range(steps - len(out))]
