"""Checkpoints and exact resume on one process, as users hit them: a stop signal, a kill -9 in the middle of a
checkpoint write, a corrupt file, a changed config, an extended run, the export of any checkpoint, and secrets
that never reach the run directory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (
    assert_real_plot,
    bitwise_equal,
    compose,
    final_weights,
    fit_and_close,
    html_images,
    poison_steps,
    read_metrics,
    record_sample_steps,
    save_tiny_model,
    signal_during_step,
)
from sftdist.cli.report import build_report, load_run
from sftdist.data.batching import collate_packed
from sftdist.run.checkpoint import MARKER, CheckpointError
from sftdist.run.export import export_checkpoint
from sftdist.run.signals import EXIT_STOPPED, STOPPED_FILE
from sftdist.run.storage import human, size_of
from sftdist.training import Trainer

# 6 steps, checkpoints at 2, 4 and 6 (the last), eval at 3 and 6: small enough for a few seconds per run.
COMMON = (
    "data.demo_size=300",
    "train.global_batch_size=8",
    "train.max_steps=6",
    "checkpoint.every_steps=2",
    "checkpoint.keep=3",
    "eval.every_steps=3",
    "eval.probes.max_new_tokens=24",  # (the probes are tested elsewhere; here they only have to resume exactly)
    "wandb.mode=disabled",
)
BIN = Path(sys.executable).parent


def _trainer(out: Path, *overrides: str) -> Trainer:
    return Trainer(compose(*COMMON, f"output_dir={out}", *overrides))


def _cli_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}


def _sftdist_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "sftdist-train"), *args], cwd=cwd, env=_cli_env(), capture_output=True, text=True, timeout=600
    )


def _started(args: tuple[str, ...], cwd: Path, rows: int) -> subprocess.Popen:
    """sftdist-train ``args`` in the background, once its metrics.jsonl holds ``rows`` rows (or it ended)."""
    proc = subprocess.Popen(
        [str(BIN / "sftdist-train"), *args], cwd=cwd, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    metrics = cwd / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= rows) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 6-step run every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("straight")
    trainer = _trainer(out)
    samples = record_sample_steps(trainer)
    fit_and_close(trainer)
    return out, samples


def test_a_stopped_and_resumed_run_equals_the_uninterrupted_one(straight, tmp_path):
    out, reference_samples = straight
    first = _trainer(tmp_path)
    signal_during_step(first, 3)
    samples = record_sample_steps(first)
    result = fit_and_close(first)
    assert (result["stopped_by"], result["step"]) == ("SIGUSR1", 3)
    assert not (tmp_path / "final").exists()  # stopped: a checkpoint, no export
    stopped = json.loads((tmp_path / "stopped.json").read_text())
    assert stopped == {
        **stopped,
        "signal": "SIGUSR1",
        "step": 3,
        "exit_status": 75,
        "checkpoint": str(tmp_path / "checkpoints" / "step_3"),
    }
    second = _trainer(tmp_path)
    assert second.start_step == 3 and second.resume_from == tmp_path / "checkpoints" / "step_3"
    resumed_samples = record_sample_steps(second)
    fit_and_close(second)
    assert samples + resumed_samples == reference_samples  # the same samples, each step once
    ours, theirs = read_metrics(tmp_path), read_metrics(out)
    assert [m["step"] for m in ours] == [1, 2, 3, 4, 5, 6]
    timings = {"train/tokens_per_s", "train/step_s"}
    for a, b in zip(ours, theirs):  # losses, grad norms, eval losses: identical, not close
        assert {k: v for k, v in a.items() if k not in timings} == {k: v for k, v in b.items() if k not in timings}
    assert bitwise_equal(final_weights(tmp_path), final_weights(out))
    assert _lines(tmp_path / "probes.jsonl") == _lines(out / "probes.jsonl")  # each eval's answers once, the same
    report, drawn = build_report([tmp_path], tmp_path / "report")  # plotted as one run
    assert [r["step"] for r in load_run(tmp_path).rows] == list(range(7)) and "loss" in drawn
    for name in drawn:
        assert_real_plot(report / f"{name}.png")
    assert set(html_images(report / "report.html")) == {f"{name}.png" for name in drawn}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_sigterm_writes_a_checkpoint_exits_75_and_a_plain_restart_finishes(straight, tmp_path):
    out, _ = straight
    args = (*COMMON, f"output_dir={tmp_path / 'run'}")
    proc = _started(args, tmp_path, rows=2)
    metrics = tmp_path / "run" / "metrics.jsonl"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_STOPPED == 75, stderr[-3000:]
    assert "SIGTERM: finishing this step, then writing a checkpoint" in stderr
    stopped_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert stopped_at < 6 and (tmp_path / "run" / "checkpoints" / f"step_{stopped_at}" / MARKER).is_file()
    again = _sftdist_train(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / f'step_{stopped_at}'}" in again.stdout
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    assert bitwise_equal(final_weights(tmp_path / "run"), final_weights(out))


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_first(tmp_path):
    """The same command twice (an sbatch submitted twice, a second terminal): the second stops at once with one line
    naming the first, which trains on alone (one metrics row per step), writes nothing of the second's."""
    args = (*COMMON, "train.max_steps=1000", "eval.every_steps=0", f"output_dir={tmp_path / 'run'}")
    first = _started(args, tmp_path, rows=1)
    second = _sftdist_train(*args, cwd=tmp_path)
    assert first.poll() is None  # (the first still trains: the refusal was the lock's)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
    assert second.returncode == 2 and second.stdout == "", second.stderr[-3000:]
    assert second.stderr.count("\n") == 1 and second.stderr.startswith("sftdist-train: error: output_dir=")
    assert f"is in use by the run of process {first.pid} on " in second.stderr
    assert first.returncode == EXIT_STOPPED
    steps = [m["step"] for m in read_metrics(tmp_path / "run")]
    assert steps == list(range(1, len(steps) + 1))


# Kills the process with SIGKILL inside a checkpoint write: after step_4 is renamed into place, before its
# COMPLETE marker is written (the one moment a step_N directory exists but is torn).
_KILL_IN_WRITE = """
import os, signal, sys
import sftdist.run.checkpoint as checkpoint
publish = checkpoint._publish
def torn(tmp, final, step):
    if step == 4:
        tmp.rename(final)
        os.kill(os.getpid(), signal.SIGKILL)
    publish(tmp, final, step)
checkpoint._publish = torn
from sftdist.train import main
sys.argv = ["sftdist-train", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
def test_a_stop_signal_during_the_set_up_stops_before_the_first_step(straight, tmp_path, monkeypatch, resumed):
    """A preemption while the data is prepared (minutes on a large set) is caught, not fatal: the run stops before
    its first step, points at what to resume from (nothing, or the checkpoint it resumed), and a restart trains on
    to the uninterrupted weights."""
    import sftdist.training.trainer

    out, _ = straight
    run = tmp_path / "run"
    if resumed:
        shutil.copytree(out / "checkpoints" / "step_2", run / "checkpoints" / "step_2")
    prepare = sftdist.training.trainer.build_datasets

    def prepare_and_get_preempted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)  # without the trainer's handler by now, this would end pytest
        return prepare(*args, **kwargs)

    monkeypatch.setattr(sftdist.training.trainer, "build_datasets", prepare_and_get_preempted)
    result = fit_and_close(_trainer(run))
    monkeypatch.undo()
    assert (result["stopped_by"], result["step"]) == ("SIGUSR1", 2 if resumed else 0)
    stopped = json.loads((run / STOPPED_FILE).read_text())
    assert stopped["checkpoint"] == (str(run / "checkpoints" / "step_2") if resumed else None)
    assert not (run / "metrics.jsonl").exists() or not read_metrics(run)[2:]  # nothing trained
    assert sorted(p.name for p in (run / "checkpoints").glob("*")) == (["step_2"] if resumed else [])
    fit_and_close(_trainer(run))
    assert bitwise_equal(final_weights(run), final_weights(out))


def test_a_stop_signal_during_the_last_step_finishes_the_run(tmp_path):
    trainer = _trainer(tmp_path)
    signal_during_step(trainer, 6)
    result = fit_and_close(trainer)
    assert "stopped_by" not in result and (tmp_path / "final" / "model.safetensors").is_file()
    assert not (tmp_path / "stopped.json").exists()


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_usable(straight, tmp_path):
    out, _ = straight
    args = (*COMMON, f"output_dir={tmp_path / 'run'}")
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_IN_WRITE, *args],
        cwd=tmp_path,
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    torn = tmp_path / "run" / "checkpoints" / "step_4"
    assert torn.is_dir() and not (torn / MARKER).exists()
    again = _sftdist_train(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"skipping {torn}: it has no COMPLETE marker (its write was interrupted)" in again.stdout
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / 'step_2'}" in again.stdout
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    assert bitwise_equal(final_weights(tmp_path / "run"), final_weights(out))
    assert (torn / MARKER).is_file()  # written again, whole, by the resumed run


def test_a_run_with_a_left_out_step_resumes_exactly_and_goes_on_counting(straight, tmp_path):
    """Step 2 non-finite (left out), a stop signal during step 3, the same command: the weights are the
    uninterrupted poisoned run's and train/skipped_steps counts on from the checkpoint."""
    straight_poisoned = _trainer(tmp_path / "straight")
    poison_steps(straight_poisoned, {1})
    fit_and_close(straight_poisoned)
    stopped = _trainer(tmp_path / "run")
    poison_steps(stopped, {1})
    signal_during_step(stopped, 3)
    assert fit_and_close(stopped)["stopped_by"] == "SIGUSR1"
    resumed = _trainer(tmp_path / "run")
    assert (resumed.start_step, resumed.nonfinite.skipped) == (3, 1)
    fit_and_close(resumed)
    assert [m["train/skipped_steps"] for m in read_metrics(tmp_path / "run")] == [0, 1, 1, 1, 1, 1]
    assert bitwise_equal(final_weights(tmp_path / "run"), final_weights(tmp_path / "straight"))
    assert not bitwise_equal(final_weights(tmp_path / "run"), final_weights(straight[0]))  # (step 2 was left out)


def test_early_stopping_keeps_the_best_checkpoint_and_exports_it(tmp_path):
    """A learning rate too high for the demo: the eval loss falls, then rises. The run stops at the eval that makes
    the second without an improvement, with exit 0 and a checkpoint; the best one is kept outside the cadence, and
    final/ is its export; the metrics say the best step."""
    cfg = compose(
        f"output_dir={tmp_path / 'run'}", "train.max_steps=20", "eval.every_steps=2", "train.lr=0.02",
        "checkpoint.keep_best=eval/loss", "train.early_stopping_patience=2", "checkpoint.export_best=true",
        "checkpoint.every_steps=0", "eval.probes.num=0", "wandb.mode=disabled", "data.demo_size=300",
        "train.global_batch_size=8",
    )  # fmt: skip
    fit_and_close(Trainer(cfg))
    rows = read_metrics(tmp_path / "run")
    fit_and_close(Trainer(cfg))  # the same command again: it stopped early, nothing is left to train
    assert read_metrics(tmp_path / "run") == rows
    evals = [(m["step"], m["eval/loss"]) for m in read_metrics(tmp_path / "run") if "eval/loss" in m]
    (best_step, best), since = evals[0], 0
    for step, loss in evals[1:]:  # the rule, written again: the stop is where it says
        best_step, best, since = (step, loss, 0) if loss < best else (best_step, best, since + 1)
        if since == 2:
            break
    assert step < 20 and read_metrics(tmp_path / "run")[-1]["step"] == step
    assert read_metrics(tmp_path / "run")[-1]["checkpoint/best_step"] == best_step and best_step != step
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == sorted({f"step_{best_step}", f"step_{step}"})
    export_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{best_step}", tmp_path / "best")
    assert bitwise_equal(final_weights(tmp_path / "run"), load_file(str(tmp_path / "best" / "model.safetensors")))
    assert json.loads((tmp_path / "run" / "final" / "sftdist_training.json").read_text())["step"] == best_step


@contextlib.contextmanager
def _small_file_system(directory: Path, size: int):
    """A tmpfs of ``size`` bytes at ``directory`` (mounted as root, or with sudo -n), and a function that resizes it;
    skips where this user cannot mount."""
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    directory.mkdir()
    options = f"size={size},uid={os.getuid()},gid={os.getgid()}"
    if subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)]).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root or sudo -n")

    def resize(new_size: int) -> None:
        subprocess.run([*sudo, "mount", "-o", f"remount,size={new_size}", str(directory)], check=True)

    try:
        yield resize
    finally:
        subprocess.run([*sudo, "umount", str(directory)], check=True)


def test_a_full_disk_during_a_checkpoint_stops_in_one_line_and_the_same_command_resumes(straight, tmp_path):
    """On a file system with room for one checkpoint: the log warns before the second that it may not fit, the run
    stops in one line naming it and the space, the torn directory is removed and the first kept; with space freed,
    the same command resumes from it and ends bitwise where the uninterrupted run ends."""
    out, _ = straight
    size = size_of(out / "checkpoints" / "step_2")
    with _small_file_system(tmp_path / "disk", int(1.5 * size)) as resize:
        args = (*COMMON, f"output_dir={tmp_path / 'disk' / 'run'}")
        full = _sftdist_train(*args, cwd=tmp_path)
        checkpoints = tmp_path / "disk" / "run" / "checkpoints"
        assert full.returncode == 2 and len(full.stderr.strip().splitlines()) == 1, full.stderr[-3000:]
        assert re.fullmatch(
            f"sftdist-train: error: cannot write the checkpoint {checkpoints / 'step_4'}: No space left on device "
            r"\(ENOSPC\); [\d.]+ MiB free there, about [\d.]+ MiB needed; the checkpoints before it are untouched: "
            "free space, then the same command resumes",
            full.stderr.strip(),
        ), full.stderr
        assert f"a checkpoint takes about {human(size)}: the next one may not fit" in full.stdout
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2"]
        resize(4 * size)
        again = _sftdist_train(*args, cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"resuming from {checkpoints / 'step_2'}" in again.stdout
        assert [m["step"] for m in read_metrics(tmp_path / "disk" / "run")] == [1, 2, 3, 4, 5, 6]
        assert bitwise_equal(final_weights(tmp_path / "disk" / "run"), final_weights(out))


@pytest.fixture
def finished(straight, tmp_path):
    """A copy of the finished straight run (checkpoints at 2, 4 and 6)."""
    shutil.copytree(straight[0], tmp_path / "run")
    return tmp_path / "run"


def test_a_corrupt_checkpoint_is_named_skipped_by_auto_and_refused_by_path(finished, caplog):
    shard = finished / "checkpoints" / "step_6" / "state" / "__0_0.distcp"
    size = shard.stat().st_size
    with shard.open("r+b") as f:
        f.truncate(size // 2)
    with caplog.at_level("WARNING"):
        trainer = _trainer(finished)
    assert trainer.resume_from == finished / "checkpoints" / "step_4" and trainer.start_step == 4
    named = f"skipping {finished / 'checkpoints' / 'step_6'}: state/__0_0.distcp has {size // 2} bytes where {size}"
    assert named in caplog.text
    trainer.close()
    with pytest.raises(CheckpointError, match=r"step_6' is not a usable checkpoint: state/__0_0.distcp has \d+ bytes"):
        _trainer(finished, f"resume={finished / 'checkpoints' / 'step_6'}")


@pytest.mark.parametrize(
    "override,named",
    [
        ("model.num_layers=2", "model.num_layers 4 -> 2"),
        ("data.demo_size=400", "data.demo_size 300 -> 400"),
        ("seed=1", "seed 0 -> 1"),
        ("train.global_batch_size=4", "train.global_batch_size 8 -> 4"),
        ("data.packing=false", "data.packing True -> False"),
    ],
)
def test_a_resume_that_would_train_something_else_is_refused_naming_the_keys(finished, override, named):
    before = (finished / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="belongs to a different run") as info:
        _trainer(finished, override, "train.max_steps=8")
    assert named in str(info.value) and "resume=never" in str(info.value)
    if override.startswith("data.demo_size"):
        assert "data fingerprint" in str(info.value)  # the content changed too
    assert (finished / "metrics.jsonl").read_text() == before  # a refused start writes nothing


def test_extending_a_finished_run_continues_from_its_last_checkpoint(finished, caplog):
    with caplog.at_level("INFO"):
        trainer = _trainer(finished, "train.max_steps=8", "train.lr=5e-4", "eval.every_steps=4")
    assert trainer.start_step == 6
    changed = caplog.text.split("with changed settings: ")[1].splitlines()[0]
    for change in ("eval.every_steps 3 -> 4", "train.lr 0.001 -> 0.0005", "train.max_steps 6 -> 8"):
        assert change in changed
    fit_and_close(trainer)
    assert [m["step"] for m in read_metrics(finished)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert json.loads((finished / "final" / "sftdist_training.json").read_text())["step"] == 8


def test_a_finished_run_started_again_trains_nothing(finished, straight):
    trainer = _trainer(finished)
    assert trainer.start_step == 6
    fit_and_close(trainer)
    assert (finished / "metrics.jsonl").read_text() == (straight[0] / "metrics.jsonl").read_text()
    assert bitwise_equal(final_weights(finished), final_weights(straight[0]))


def test_resume_never_starts_fresh_and_removes_the_earlier_checkpoints(finished, caplog):
    with caplog.at_level("WARNING"):
        trainer = _trainer(finished, "resume=never", "train.max_steps=2")
    assert trainer.start_step == 0 and "removing the checkpoints of an earlier run" in caplog.text
    fit_and_close(trainer)
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["step_2"]


def test_resume_path_continues_another_runs_checkpoint_in_a_new_directory(finished, tmp_path):
    trainer = _trainer(tmp_path / "new", f"resume={finished}", "train.max_steps=7")
    assert trainer.resume_from == finished / "checkpoints" / "step_6" and trainer.start_step == 6
    original = json.loads((finished / "checkpoints" / "step_6" / "trainer_state.json").read_text())["wandb_run_id"]
    assert trainer.checkpointer.wandb_run_id != original  # a branch is a W&B run of its own, not a takeover
    fit_and_close(trainer)
    assert [m["step"] for m in read_metrics(tmp_path / "new")] == [7]
    with pytest.raises(CheckpointError, match="is neither a checkpoint"):
        _trainer(tmp_path / "other", f"resume={tmp_path}")


def test_sftdist_export_of_the_last_checkpoint_equals_final_and_shards_above_a_size(finished, tmp_path):
    from transformers import AutoModelForCausalLM

    proc = subprocess.run(
        [str(BIN / "sftdist-export"), str(finished), str(tmp_path / "whole")],
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / "whole" / name).read_bytes() == (finished / "final" / name).read_bytes(), name
    proc = subprocess.run(
        [
            str(BIN / "sftdist-export"),
            str(finished / "checkpoints" / "step_4"),
            str(tmp_path / "sharded"),
            "--max-shard-size",
            "4MB",
        ],
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 2
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # Reloaded with transformers, the step-4 export gives the logits of the model resumed from step 4.
    trainer = _trainer(finished, f"resume={finished / 'checkpoints' / 'step_4'}", f"output_dir={tmp_path / 'x'}")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sharded"))
    sample = trainer.train_set[0]
    trainer.model.eval()
    with torch.no_grad():  # the trainer's model runs packed attention: one sample is a packed row of one
        expected = trainer.runner.logits(collate_packed([sample], len(sample.input_ids)))
        assert torch.allclose(reloaded(input_ids=torch.tensor([sample.input_ids])).logits, expected, atol=1e-5)
    trainer.close()
    bad = subprocess.run(
        [str(BIN / "sftdist-export"), str(tmp_path / "nothing"), str(tmp_path / "out")],
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "sftdist-export: error: checkpoint=" in bad.stderr and "Traceback" not in bad.stderr


def test_secrets_in_the_environment_never_reach_the_run_directory(tmp_path):
    secrets = {
        "WANDB_API_KEY": "0123456789abcdef0123456789abcdef0123sdft",  # W&B keys are 40 characters
        "HF_TOKEN": "hf_sftdistSecretToken8d2e7b41",
        "OPENAI_API_KEY": "sk-sftdist-secret-9c1f3a7e",
    }
    env = {**_cli_env(), **secrets, "WANDB_MODE": "offline"}
    args = (*COMMON, "train.max_steps=2", "wandb.mode=offline", f"output_dir={tmp_path / 'run'}")
    proc = subprocess.run(
        [str(BIN / "sftdist-train"), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any("checkpoints" in p.parts for p in files)
    for path in files:
        content = path.read_bytes()
        for value in secrets.values():
            assert value.encode() not in content, f"{value} written to {path}"


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    first = _trainer(tmp_path, "wandb.mode=offline")
    signal_during_step(first, 2)
    fit_and_close(first)
    second = _trainer(tmp_path, "wandb.mode=offline")
    assert second.checkpointer.wandb_run_id == first.checkpointer.wandb_run_id
    fit_and_close(second)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and {p.name.rsplit("-", 1)[-1] for p in runs} == {first.checkpointer.wandb_run_id}


def test_the_rng_states_are_restored_so_dropout_draws_as_in_the_uninterrupted_run(tmp_path, monkeypatch):
    save_tiny_model(tmp_path / "model", attention_dropout=0.3)
    overrides = (
        f"model.name_or_path={tmp_path / 'model'}",
        "train.max_steps=4",
        "eval.every_steps=0",
        "data.max_length=512",
    )

    def stopped_and_resumed(out: Path) -> list[float]:
        first = _trainer(out, *overrides)
        signal_during_step(first, 2)
        fit_and_close(first)
        fit_and_close(_trainer(out, *overrides))
        return [m["train/loss"] for m in read_metrics(out)]

    fit_and_close(_trainer(tmp_path / "straight", *overrides))
    straight = [m["train/loss"] for m in read_metrics(tmp_path / "straight")]
    assert stopped_and_resumed(tmp_path / "resumed") == straight
    # The check can fail: without the RNG states, the resumed steps draw other dropout masks.
    monkeypatch.setattr("sftdist.run.checkpoint.restore_rng", lambda states: None)
    unrestored = stopped_and_resumed(tmp_path / "unrestored")
    assert unrestored[:2] == straight[:2] and unrestored[2:] != straight[2:]
