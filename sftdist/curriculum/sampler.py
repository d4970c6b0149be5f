"""The difficulty curriculum: each training sample in a bucket (easy, medium, hard), and the samples of each step
drawn from the buckets by the weights of the step's phase.

Phases end at fractions of ``train.max_steps``; the mission's three (``conf/curriculum/three_phase.yaml``)::

    steps (of 100)   0 ........ 20 ..................... 60 ................... 100
    easy/med/hard      0.9/0.1/0      0.3/0.5/0.2              0.1/0.4/0.5

The samples of a step are a pure function of (seed, step): every bucket is its own stream (a fresh seeded
permutation each time it is exhausted), and the number a step takes from each is fixed by the schedule alone. So
the stream is the same on any number of processes, any micro-batch budget, packed or not, and after any resume.

Counts per step: over steps 0..s-1 bucket b is owed ``C_b(s) = B * sum of its weights``; step s takes from each
bucket what it is owed then (``C_b(s+1)`` less what it was given), rounded so that the step's counts add up to
``B`` (largest remainders first, never negative). Every bucket's cumulative count stays within one sample of what
it is owed, and a step's fractions are the weights within one sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sftdist.config import PhaseConfig
from sftdist.errors import ConfigError

BUCKETS = ("easy", "medium", "hard")
_STRIDE = 1024


@dataclass(frozen=True)
class Phase:
    until: float  # ends at this fraction of max_steps
    weights: tuple[float, float, float]  # easy, medium, hard


def config_phases(phases: Sequence[PhaseConfig]) -> list[Phase]:
    """``curriculum.phases`` as :class:`Phase` objects."""
    return [Phase(p.until, (p.easy, p.medium, p.hard)) for p in phases]


def phase_ends(phases: Sequence[Phase], max_steps: int) -> list[int]:
    """The first step (0-based) after each phase: phase i holds the steps ``ends[i-1] <= step < ends[i]``."""
    return [round(p.until * max_steps) for p in phases]


class CurriculumSampler:
    """Global batches of sample indices drawn from difficulty buckets by a step-scheduled mixture.

    ``buckets[i]`` is the bucket (0, 1, 2) of training sample ``i``. The same interface as
    :class:`sftdist.data.batching.StepSampler` (``indices(step)``, ``epoch(step)``), plus what a step took.
    """

    def __init__(self, buckets: np.ndarray, phases: Sequence[Phase], global_batch_size: int, max_steps: int, seed: int):
        self.buckets = np.asarray(buckets, dtype=np.int8)
        self.members = [np.flatnonzero(self.buckets == b) for b in range(len(BUCKETS))]
        self.phases, self.global_batch_size, self.max_steps, self.seed = (
            list(phases),
            global_batch_size,
            max_steps,
            seed,
        )
        self.num_samples = len(self.buckets)
        self.ends = phase_ends(self.phases, max_steps)
        # Drawn from each bucket before step s, remembered every _STRIDE steps and at the last step asked for,
        # so that any step is a short walk from a known one (a resume far into a run included).
        self._anchors = {0: np.zeros(len(BUCKETS), dtype=np.int64)}
        self._last = (0, self._anchors[0])
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def phase(self, step: int) -> int:
        """The 0-based phase of 0-based ``step`` (the last phase past max_steps)."""
        return next((i for i, end in enumerate(self.ends) if step < end), len(self.ends) - 1)

    def _owed(self, steps: int) -> np.ndarray:
        """What each bucket is owed over steps 0..steps-1 (fractional)."""
        owed, start = np.zeros(len(BUCKETS)), 0
        for phase, end in zip(self.phases, self.ends):
            owed += max(0, min(end, steps) - start) * self.global_batch_size * np.asarray(phase.weights)
            start = max(start, end)
        if steps > start:  # past the schedule: the last phase goes on
            owed += (steps - start) * self.global_batch_size * np.asarray(self.phases[-1].weights)
        return owed

    def _take(self, step: int, given: np.ndarray) -> np.ndarray:
        """What step ``step`` takes from each bucket, ``given`` having been drawn before it: what each is owed
        then, floored, and the rest of the batch to the largest remainders (never a negative count)."""
        need = self._owed(step + 1) - given
        take = np.maximum(np.floor(need), 0).astype(np.int64)
        short = self.global_batch_size - int(take.sum())
        for b in sorted(range(len(BUCKETS)), key=lambda b: (-(need[b] - take[b]), b))[:short]:
            take[b] += 1
        return take

    def _given(self, step: int) -> np.ndarray:
        known = [(a, g) for a, g in self._anchors.items() if a <= step]
        s, given = max(known + [self._last] * (self._last[0] <= step), key=lambda item: item[0])
        while s < step:
            given, s = given + self._take(s, given), s + 1
            if s % _STRIDE == 0:
                self._anchors[s] = given
        self._last = (s, given)
        return given

    def counts(self, step: int) -> np.ndarray:
        """How many samples step ``step`` takes from each bucket (they add up to the global batch)."""
        return self._take(step, self._given(step))

    def _stream(self, bucket: int, start: int, count: int) -> list[int]:
        """Samples ``start .. start+count-1`` of a bucket's stream: seeded permutations, one per bucket epoch."""
        members, out = self.members[bucket], []
        for position in range(start, start + count):
            epoch, offset = divmod(position, len(members))
            key = (bucket, epoch)
            if key not in self._perms:
                if len(self._perms) > 8:
                    self._perms.pop(next(iter(self._perms)))
                self._perms[key] = np.random.default_rng([self.seed, 4, bucket, epoch]).permutation(members)
            out.append(int(self._perms[key][offset]))
        return out

    def indices(self, step: int) -> list[int]:
        """Sample indices of 0-based optimizer step ``step``: the easy ones, then medium, then hard."""
        given = self._given(step)
        counts = self._take(step, given)
        return [i for b in range(len(BUCKETS)) for i in self._stream(b, int(given[b]), int(counts[b]))]

    def epoch(self, step: int) -> float:
        """Epochs of the whole training set drawn after ``step`` (buckets drain at different rates)."""
        return (step + 1) * self.global_batch_size / self.num_samples

    def bucket_epochs(self, step: int) -> np.ndarray:
        """Epochs completed of each bucket after 0-based ``step``."""
        sizes = np.array([max(len(m), 1) for m in self.members])
        return (self._given(step) + self.counts(step)) / sizes


def check_schedule(
    phases: Sequence[Phase], sizes: Sequence[int], global_batch_size: int, max_steps: int, renormalise: bool
) -> tuple[list[Phase], list[str]]:
    """The phases to train with, or ConfigError naming the phase and bucket: a bucket with no samples that a phase
    needs (or, with ``renormalise``, that phase's weights spread over the others, with a warning), or a bucket too
    small for its share of one step (a step would repeat its samples)."""
    warnings, out = [], []
    for i, phase in enumerate(phases):
        weights = list(phase.weights)
        empty = [BUCKETS[b] for b, w in enumerate(weights) if w > 0 and sizes[b] == 0]
        if empty and not renormalise:
            raise ConfigError(
                f"curriculum.phases[{i}] draws {', '.join(empty)} samples but that bucket is empty: "
                "set curriculum.on_empty=renormalise to spread its weight over the others, or "
                "change the weights or the difficulty scorer"
            )
        if empty:
            weights = [0.0 if sizes[b] == 0 else w for b, w in enumerate(weights)]
            if sum(weights) == 0:
                raise ConfigError(f"curriculum.phases[{i}] draws only from empty buckets ({', '.join(empty)})")
            weights = [w / sum(weights) for w in weights]
            warnings.append(
                f"curriculum.phases[{i}]: the {', '.join(empty)} bucket is empty; its weight is spread "
                f"over the others: {dict(zip(BUCKETS, (round(w, 4) for w in weights)))}"
            )
        out.append(Phase(phase.until, tuple(weights)))
    for i, phase in enumerate(out):
        for b, w in enumerate(phase.weights):
            # a step takes what its bucket is owed (under w * B + 1 when it lags), rounded up at most
            most = math.ceil(w * global_batch_size) + 1 if w > 0 else 0
            if sizes[b] and most > sizes[b]:
                raise ConfigError(
                    f"curriculum.phases[{i}] takes up to {most} {BUCKETS[b]} samples a step but that "
                    f"bucket holds {sizes[b]}: a step would repeat samples; lower "
                    "train.global_batch_size or the weight"
                )
    if max_steps and phase_ends(out, max_steps)[-1] != max_steps:
        raise ConfigError("curriculum.phases must end at until=1.0")
    return out, warnings
