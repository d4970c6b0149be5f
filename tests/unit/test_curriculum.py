"""The curriculum sampler (step-scheduled mixtures, exact and resumable), the difficulty scorers, and the checks
that refuse a schedule the data cannot serve."""

from __future__ import annotations

import re

import numpy as np
import pytest

from helpers import compose
from sftdist.config import ConfigError
from sftdist.curriculum.difficulty import MISSING, cut, meta_buckets
from sftdist.curriculum.sampler import BUCKETS, CurriculumSampler, Phase, check_schedule, phase_ends

THREE_PHASE = [Phase(0.2, (0.9, 0.1, 0.0)), Phase(0.6, (0.3, 0.5, 0.2)), Phase(1.0, (0.1, 0.4, 0.5))]


def _buckets(n: int = 3000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3, n).astype(np.int8)


def test_over_ten_thousand_steps_per_phase_the_realised_fractions_are_the_weights():
    steps, batch = 50_000, 16  # phases of 10k, 20k and 20k steps
    sampler = CurriculumSampler(_buckets(), THREE_PHASE, batch, steps, seed=0)
    assert sampler.ends == [10_000, 30_000, 50_000]
    given, owed, worst = np.zeros(3), np.zeros(3), 0.0
    totals = np.zeros((3, 3))
    for step in range(steps):
        counts = sampler.counts(step)
        assert counts.sum() == batch and (counts >= 0).all()
        given += counts
        owed += batch * np.asarray(THREE_PHASE[sampler.phase(step)].weights)
        worst = max(worst, float(np.abs(given - owed).max()))
        totals[sampler.phase(step)] += counts
        bound = np.ceil(batch * np.asarray(THREE_PHASE[sampler.phase(step)].weights)) + 1  # check_schedule's
        assert (counts <= bound).all()
    assert worst < 1.0  # every bucket's cumulative count within one sample of what it is owed
    for phase, total in zip(THREE_PHASE, totals):
        assert np.allclose(total / total.sum(), phase.weights, atol=1 / (10_000 * batch))


def test_phase_boundaries_fall_at_20_and_60_percent_of_max_steps():
    for steps in (10, 100, 200, 1234):
        sampler = CurriculumSampler(_buckets(), THREE_PHASE, 8, steps, seed=0)
        assert phase_ends(THREE_PHASE, steps) == [round(0.2 * steps), round(0.6 * steps), steps]
        assert [sampler.phase(s) for s in (0, round(0.2 * steps) - 1, round(0.2 * steps), round(0.6 * steps))] == [
            0,
            0,
            1,
            2,
        ]


def test_the_samples_of_a_step_are_a_pure_function_of_seed_and_step():
    buckets = _buckets()
    walked = CurriculumSampler(buckets, THREE_PHASE, 16, 3000, seed=5)
    stream = [walked.indices(step) for step in range(3000)]
    resumed = CurriculumSampler(buckets, THREE_PHASE, 16, 3000, seed=5)  # a resume at step 1777, mid-phase 2
    assert [resumed.indices(step) for step in range(1777, 3000)] == stream[1777:]
    assert resumed.indices(5) == stream[5]  # and back again
    for step in (0, 700, 2500):
        assert all(buckets[i] == b for i, b in zip(stream[step], sorted(buckets[stream[step]])))
        assert len(set(stream[step])) == 16  # no sample twice in one step
    other = CurriculumSampler(buckets, THREE_PHASE, 16, 3000, seed=6)
    assert other.indices(100) != stream[100]


def test_each_bucket_is_its_own_stream_reshuffled_when_exhausted():
    buckets = np.array([0] * 10 + [1] * 40 + [2] * 40, dtype=np.int8)
    sampler = CurriculumSampler(buckets, [Phase(1.0, (0.5, 0.25, 0.25))], 4, 100, seed=0)
    easy = [i for s in range(10) for i in sampler.indices(s) if buckets[i] == 0]  # 2 a step: 2 bucket epochs
    assert sorted(easy[:10]) == list(range(10)) and sorted(easy[10:]) == list(range(10)) and easy[:10] != easy[10:]
    assert sampler.bucket_epochs(9)[0] == pytest.approx(2.0)


def test_an_empty_bucket_is_refused_or_renormalised_and_a_small_one_refused():
    with pytest.raises(ConfigError, match=r"curriculum.phases\[1\] draws hard samples but that bucket is empty"):
        check_schedule(THREE_PHASE, [100, 100, 0], 8, 100, renormalise=False)
    phases, warnings = check_schedule(THREE_PHASE, [100, 100, 0], 8, 100, renormalise=True)
    assert phases[1].weights == pytest.approx((0.375, 0.625, 0.0)) and "hard bucket is empty" in warnings[0]
    assert phases[0].weights == (0.9, 0.1, 0.0) and len(warnings) == 2
    with pytest.raises(ConfigError, match=r"phases\[0\] takes up to 16 easy samples a step but that bucket holds 15"):
        check_schedule(THREE_PHASE, [15, 100, 100], 16, 100, renormalise=False)
    check_schedule(THREE_PHASE, [16, 100, 100], 16, 100, renormalise=False)  # 14.4 a step: 15 or 16, never more


def test_meta_labels_are_names_or_numbers_cut_at_the_thresholds():
    metas = [
        {"difficulty": "easy"},
        {"difficulty": "HARD "},
        {"difficulty": 0.5},
        {"difficulty": 1.5},
        {"difficulty": 7},
        {},
        {"difficulty": "expert"},
        {"difficulty": True},
        {"difficulty": float("nan")},
    ]
    assert meta_buckets(metas, [1.0, 2.0]).tolist() == [0, 2, 0, 1, 2, MISSING, MISSING, MISSING, MISSING]


def test_quantile_cuts_come_from_the_training_rows_and_give_tertiles():
    scores = np.arange(90, dtype=float)
    buckets, edges = cut(scores, np.arange(0, 90, 1), [1 / 3, 2 / 3])
    assert np.bincount(buckets).tolist() == [30, 30, 30] and edges == pytest.approx([29.667, 59.333], abs=1e-3)
    buckets, _ = cut(scores, np.arange(0, 30), [1 / 3, 2 / 3])  # rows outside the training rows are cut alike
    assert (buckets[30:] == 2).all()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["curriculum.phases.0.easy=0.8"],
            "curriculum.phases[0]: the weights {'easy': 0.8, 'medium': 0.1, 'hard': 0.0} sum to 0.9, not 1",
        ),
        (["curriculum.phases.1.until=0.1"], "curriculum.phases[1].until=0.1: phase ends must increase"),
        (["curriculum.phases.2.until=0.9"], "curriculum.phases[2].until=0.9: the last phase must end at 1.0"),
        (["curriculum.phases.0.hard=-0.1", "curriculum.phases.0.easy=1.0"], "curriculum.phases[0].hard=-0.1 must be"),
        (["curriculum.difficulty=perplexity"], "curriculum.difficulty='perplexity' is not one of"),
        (["curriculum.quantiles=[0.5,0.2]"], "curriculum.quantiles=[0.5, 0.2]: give two increasing numbers"),
        (["curriculum.on_empty=ignore"], "curriculum.on_empty='ignore' is not one of: error, renormalise"),
        (["train.stop_after_step=300"], "train.stop_after_step=300 must be in [1, train.max_steps=200]"),
    ],
)
def test_bad_schedules_fail_at_start_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose("curriculum=three_phase", *overrides)


def test_an_unknown_bucket_name_fails_naming_it():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(
        ConfigError,
        match=re.escape(
            "unknown key curriculum.phases[0].expert; valid keys under curriculum.phases[0]: until, easy, medium, hard"
        ),
    ):
        compose("curriculum=three_phase", "+curriculum.phases.0.expert=0.1")
    with pytest.raises(ConfigCompositionException) as info:  # without +: Hydra refuses it, naming it too
        compose("curriculum=three_phase", "curriculum.phases.0.expert=0.1")
    assert "expert" in str(info.value) + str(info.value.__cause__)


def test_bucket_names_are_the_three_of_the_config():
    cfg = compose("curriculum=three_phase")
    assert BUCKETS == ("easy", "medium", "hard") and {"easy", "medium", "hard"} <= vars(cfg.curriculum.phases[0]).keys()
