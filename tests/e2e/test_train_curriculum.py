"""The three-phase curriculum end to end: the demo logs each step's phase and mixture, the stream does not depend
on how a step is cut, a run stopped at each phase's end and continued ends where the uninterrupted one does, the
scorers bucket real data (model_loss cached), and schedules the data cannot serve fail before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import (
    SHARED,
    TEST_DATA,
    bitwise_equal,
    compose,
    final_weights,
    fit_and_close,
    read_metrics,
    record_sample_steps,
    signal_during_step,
)
from sftdist.config import ConfigError
from sftdist.data.demo import generate_demo_conversations
from sftdist.errors import DataError
from sftdist.run.signals import STOPPED_FILE
from sftdist.training import Trainer

COMMON = (
    "curriculum=three_phase",
    "data.demo_size=600",
    "train.max_steps=20",
    "eval.every_steps=10",
    "eval.probes.max_new_tokens=24",  # (the probes are tested elsewhere; here they only have to resume exactly)
    "checkpoint.every_steps=0",
    "wandb.mode=disabled",
)
WEIGHTS = [(0.9, 0.1, 0.0), (0.3, 0.5, 0.2), (0.1, 0.4, 0.5)]


def _trainer(out: Path, *overrides: str) -> Trainer:
    return Trainer(compose(*COMMON, f"output_dir={out}", *overrides))


def test_the_demo_logs_each_steps_phase_and_mixture(tmp_path, caplog):
    with caplog.at_level("INFO"):
        fit_and_close(_trainer(tmp_path))
    metrics = read_metrics(tmp_path)
    assert [m["data/phase"] for m in metrics] == [1] * 4 + [2] * 8 + [3] * 8  # phases end at 20% and 60%
    for phase, weights in enumerate(WEIGHTS, start=1):
        rows = [m for m in metrics if m["data/phase"] == phase]
        for name, weight in zip(("easy", "medium", "hard"), weights):
            realised = np.mean([m[f"data/frac_{name}"] for m in rows])
            assert abs(realised - weight) <= 1 / 16, (phase, name, realised)  # within one sample per step
    assert all(m["data/epoch_hard"] == 0 for m in metrics[:4]) and metrics[-1]["data/epoch_hard"] > 0
    evals = [m for m in metrics if "eval/loss" in m]
    assert len(evals) == 2 and all({"eval/loss_easy", "eval/loss_medium", "eval/loss_hard"} <= m.keys() for m in evals)
    report = json.loads((tmp_path / "data_report.json").read_text())["curriculum"]
    assert report["difficulty"] == "meta" and report["unlabelled"] == 0
    assert all(n > 0 for n in report["train"].values()) and all(n > 0 for n in report["eval"].values())
    assert sum(report["train"].values()) == sum(report["by_source"]["demo"].values())
    assert "step 5/20 | phase 2 | loss" in caplog.text or "phase 2" in caplog.text


def test_the_stream_does_not_depend_on_the_micro_batch_budget_or_packing(tmp_path):
    streams = []
    for i, overrides in enumerate([(), ("train.micro_batch_tokens=1024",), ("data.packing=false",)]):
        trainer = _trainer(tmp_path / str(i), "train.max_steps=6", "eval.every_steps=0", *overrides)
        streams.append(record_sample_steps(trainer))
        fit_and_close(trainer)
    assert streams[0] == streams[1] == streams[2] and len(streams[0]) == 6


def test_stopped_at_the_end_of_each_phase_and_continued_it_ends_with_the_uninterrupted_weights(tmp_path):
    fit_and_close(_trainer(tmp_path / "straight"))
    run = tmp_path / "phased"
    for stop_after, start in ((4, 0), (12, 4)):  # the ends of phases 1 and 2 (20% and 60% of 20 steps)
        trainer = _trainer(run, f"train.stop_after_step={stop_after}")
        assert trainer.start_step == start
        assert fit_and_close(trainer)["stopped_at"] == stop_after
        assert not (run / "final").exists() and (run / "checkpoints" / f"step_{stop_after}").is_dir()
    last = _trainer(run)
    assert last.start_step == 12
    fit_and_close(last)
    ours, theirs = read_metrics(run), read_metrics(tmp_path / "straight")
    assert [m["step"] for m in ours] == list(range(1, 21))
    assert [m["train/loss"] for m in ours] == [m["train/loss"] for m in theirs]
    assert [m["data/frac_easy"] for m in ours] == [m["data/frac_easy"] for m in theirs]
    assert bitwise_equal(final_weights(run), final_weights(tmp_path / "straight"))


def test_a_phase_job_signalled_in_its_last_step_or_started_again_does_not_train_past_its_phase(tmp_path):
    """A stop signal during the step a job ends at is that job's planned end (exit 0: nothing was cut short); the
    same job started again (a requeue after its checkpoint, say) trains nothing, rather than into the next phase."""
    run = tmp_path / "run"
    first = _trainer(run, "train.stop_after_step=4")
    signal_during_step(first, 4)
    result = fit_and_close(first)
    assert result["stopped_at"] == 4 and "stopped_by" not in result and not (run / STOPPED_FILE).exists()
    again = _trainer(run, "train.stop_after_step=4")
    assert again.start_step == 4 and fit_and_close(again)["stopped_at"] == 4
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_4"] and not (run / "final").exists()


ALPACA = SHARED / "data" / "alpaca_en_demo.json"
GLAIVE = TEST_DATA / "glaive_toolcall_40.json"  # the first 40 records of ../shared/data's Glaive file


@pytest.mark.parametrize(
    "data,scorer",
    [
        (GLAIVE, "length"),
        (GLAIVE, "model_loss"),
        pytest.param(ALPACA, "length", marks=pytest.mark.skipif(not ALPACA.is_file(), reason=f"{ALPACA} is absent")),
    ],
    ids=["glaive-length", "glaive-model_loss", "alpaca-length"],
)
def test_the_scorers_bucket_real_data_and_model_loss_is_cached(tmp_path, caplog, scorer, data):
    overrides = (
        f"data.path={data}",
        "data.truncation=truncate",
        f"curriculum.difficulty={scorer}",
        "train.global_batch_size=4",
        "train.max_steps=2",
        "eval.every_steps=0",
        f"data.cache_dir={tmp_path / 'cache'}",
    )
    with caplog.at_level("INFO"):
        fit_and_close(_trainer(tmp_path / "a", *overrides))
    report = json.loads((tmp_path / "a" / "data_report.json").read_text())["curriculum"]
    assert report["difficulty"] == scorer and len(report["edges"]) == 2
    assert all(n > 0 for n in report["train"].values()), report["train"]
    if scorer == "model_loss":
        assert "model_loss: scored" in caplog.text
        caplog.clear()
        with caplog.at_level("INFO"):
            second = _trainer(tmp_path / "b", *overrides)
        second.close()
        assert "model_loss: the base model's losses from the cache" in caplog.text
        assert "model_loss: scored" not in caplog.text
        assert json.loads((tmp_path / "b" / "data_report.json").read_text())["curriculum"]["train"] == report["train"]


def test_source_weights_apply_inside_each_bucket(tmp_path):
    records = generate_demo_conversations(300, seed=4)
    for name, part in (("a", records[:150]), ("b", records[150:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    sources = f"data.sources=[{{path: {tmp_path / 'a.jsonl'}, weight: 2}}, {{path: {tmp_path / 'b.jsonl'}}}]"
    trainer = _trainer(tmp_path / "run", sources, "train.max_steps=1", "eval.every_steps=0")
    trainer.close()
    by_source = trainer.data_report.curriculum["by_source"]
    labels = {
        name: [r["meta"]["difficulty"] for r in part] for name, part in (("a", records[:150]), ("b", records[150:]))
    }
    for bucket in ("easy", "medium", "hard"):
        assert by_source["a"][bucket] == 2 * labels["a"].count(bucket)
        assert by_source["b"][bucket] == labels["b"].count(bucket)


def _write_labelled(path: Path, keep: tuple[str, ...], unlabelled: int = 0) -> str:
    records = [r for r in generate_demo_conversations(400, seed=2) if r["meta"]["difficulty"] in keep]
    for r in records[:unlabelled]:
        del r["meta"]["difficulty"]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_schedules_the_data_cannot_serve_fail_before_anything_is_written(tmp_path, caplog):
    no_hard = _write_labelled(tmp_path / "no_hard.jsonl", ("easy", "medium"))
    with pytest.raises(ConfigError, match=r"curriculum.phases\[1\] draws hard samples but that bucket is empty"):
        _trainer(tmp_path / "run", f"data.path={no_hard}")
    with pytest.raises(ConfigError, match=r"takes up to 30 easy samples a step but that bucket holds \d+"):
        _trainer(tmp_path / "run", "data.demo_size=60", "eval.every_steps=0", "train.global_batch_size=32")
    unlabelled = _write_labelled(tmp_path / "unlabelled.jsonl", ("easy", "medium", "hard"), unlabelled=100)
    with pytest.raises(DataError, match=r"\d+ of \d+ training samples have no difficulty label"):
        _trainer(tmp_path / "run", f"data.path={unlabelled}", "curriculum.on_missing=reject")
    assert not (tmp_path / "run").exists()
    with caplog.at_level("WARNING"):  # spread over the others, with a warning, when asked
        trainer = _trainer(tmp_path / "run", f"data.path={no_hard}", "curriculum.on_empty=renormalise")
    trainer.close()
    assert "the hard bucket is empty; its weight is spread over the others" in caplog.text
    fallback = _trainer(tmp_path / "fallback", f"data.path={unlabelled}")  # on_missing=fallback: scored by length
    fallback.close()
    assert 0 < fallback.data_report.curriculum["unlabelled"] <= 100  # those held out for eval not counted
    assert fallback.data_report.curriculum["fallback"]["scorer"] == "length"


def test_sftdist_inspect_shows_the_buckets_per_source():
    from sftdist.cli.inspect import inspect_data

    text = inspect_data(["data.demo_size=300", "curriculum.difficulty=turns"], 0, None, False, 10)
    line = next(line for line in text.splitlines() if line.startswith("difficulty buckets"))
    assert line.startswith("difficulty buckets (curriculum.difficulty=turns): easy ")
    counts = [int(part.split()[-1]) for part in line.split(": ", 1)[1].split(", ")]
    assert sum(counts) == 300 and "\n  demo: easy" in text
    meta = inspect_data(["data.demo_size=300"], 0, None, False, 10)
    assert "difficulty buckets (curriculum.difficulty=meta, 0 unlabelled (scored by length)): easy" in meta
