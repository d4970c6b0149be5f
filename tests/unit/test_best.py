"""The best checkpoint and early stopping (sftdist.training.best), and the pruning that keeps the best."""

from __future__ import annotations

import json

import pytest

from helpers import compose
from sftdist.errors import ConfigError
from sftdist.run.checkpoint import prune
from sftdist.run.layout import MARKER, STATE_FILE
from sftdist.training.best import BestCheckpoint


def _best(*overrides: str, saved: tuple = ()) -> BestCheckpoint:
    return BestCheckpoint(compose("checkpoint.keep_best=eval/loss", *overrides), *saved)


def test_the_best_is_the_last_eval_that_improved_by_more_than_min_delta_and_patience_counts_the_others():
    best = _best("train.early_stopping_patience=2", "train.early_stopping_min_delta=0.1")
    assert best.update(0, {"eval/loss": 1.0}) is False and best.step is None  # the baseline has no checkpoint
    assert best.update(10, {"eval/loss": 5.0}) is True
    assert best.update(20, {"eval/loss": 4.95}) is False  # better, but by less than min_delta
    assert not best.stop_early
    assert best.update(30, {"eval/loss": 4.0}) is True and best.evals_since == 0
    assert best.update(40, {"eval/loss": 4.5}) is False and best.update(50, {"eval/loss": 4.2}) is False
    assert best.stop_early and (best.step, best.value) == (30, 4.0)
    assert best.said() == {"checkpoint/best_step": 30, "checkpoint/best": 4.0}


def test_max_mode_a_resumed_count_and_a_metric_the_evals_do_not_log():
    watch = ("checkpoint.keep_best=eval/format_pass_rate", "checkpoint.keep_best_mode=max")
    best = _best(*watch, saved=(10, 0.5, 1, "eval/format_pass_rate max"))
    assert best.update(20, {"eval/format_pass_rate": 0.4}) is False and best.evals_since == 2
    assert best.update(30, {"eval/format_pass_rate": 0.6}) is True
    assert best.update(40, {"eval/format_pass_rate": float("nan")}) is False and best.step == 30
    afresh = _best(*watch, saved=(10, 2.5, 1, "eval/loss min"))  # a resume that watches another metric
    assert (afresh.step, afresh.value, afresh.evals_since) == (None, None, 0)
    with pytest.raises(
        ConfigError, match=r"checkpoint.keep_best='eval/los' is not an eval metric this run logs: eval/"
    ):
        _best("checkpoint.keep_best=eval/los").update(0, {"eval/loss": 1.0, "eval/eos_rate": 0.5})


def test_pruning_keeps_the_best_beside_the_newest(tmp_path):
    state = {"step": 0, "world_size": 1, "strategy": {}, "identity": {}, "config": {}}
    for step in (2, 4, 6, 8):  # complete checkpoints, as far as pruning looks
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / STATE_FILE).write_text(json.dumps(state))
        (tmp_path / f"step_{step}" / MARKER).write_text(json.dumps({"files": {}}))
    prune(tmp_path, keep=1, newest=8, protect=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_8"]
