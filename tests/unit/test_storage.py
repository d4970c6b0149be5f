"""Writes the file system refuses are named in one line (sftdist.run.storage)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from torch.distributed.checkpoint.api import CheckpointException

from sftdist.config import WandbConfig
from sftdist.metrics.trackers import JsonlTracker, build_metrics_logger
from sftdist.run.storage import WriteError, human, low_space_warning, write_error


def test_a_refused_write_is_named_with_its_error_and_for_space_the_sizes(tmp_path):
    denied = write_error("the export", tmp_path / "final", PermissionError(errno.EACCES, "Permission denied"))
    assert str(denied) == f"cannot write the export {tmp_path / 'final'}: Permission denied (EACCES)"
    full = write_error("the checkpoint", tmp_path / "c", OSError(errno.ENOSPC, "No space left"), needed=3 * 2**20)
    assert str(full).startswith(f"cannot write the checkpoint {tmp_path / 'c'}: No space left on device (ENOSPC); ")
    assert str(full).endswith("free there, about 3.0 MiB needed")
    assert write_error("the export", tmp_path, ValueError("not a write")) is None  # a bug of ours stays a bug
    elsewhere = FileNotFoundError(errno.ENOENT, "No such file or directory", "/models/base/model.safetensors")
    assert write_error("the export", tmp_path / "final", elsewhere, under=tmp_path) is None  # a read, not our write
    assert not denied.space and full.space


def test_torchs_short_write_inside_a_distributed_checkpoint_failure_is_a_full_disk(tmp_path):
    """torch.save on a full disk says only 'unexpected pos'; torch.distributed.checkpoint wraps it per rank."""
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    err = CheckpointException("CheckpointException ranks:dict_keys([0])", {0: (short, None)})
    message = str(write_error("the checkpoint", tmp_path, err))
    assert message.startswith(f"cannot write the checkpoint {tmp_path}: the write came up short (a full disk or quota)")


def test_a_metrics_write_on_a_full_device_stops_naming_the_file():
    tracker = JsonlTracker(Path("/dev/full"))  # every write: ENOSPC
    with pytest.raises(WriteError, match=r"^cannot write the metrics /dev/full: No space left on device \(ENOSPC\)"):
        tracker.log({"train/loss": 1.0}, step=1)


def test_the_warning_before_a_checkpoint_says_what_is_free_and_what_the_last_took(tmp_path):
    assert low_space_warning(tmp_path, 1) is None
    warning = low_space_warning(tmp_path, 2**60)
    assert warning.startswith("checkpoint: ") and f"a checkpoint takes about {human(2**60)}" in warning
    assert human(1536) == "1.5 KiB" and human(3 * 2**30) == "3.0 GiB" and human(12) == "12 B"


def test_the_low_space_warning_reaches_wandb_as_an_alert(tmp_path):
    """(an offline W&B run keeps its alerts for `wandb sync`; online, W&B sends them by e-mail or Slack)"""
    logger = build_metrics_logger(WandbConfig(mode="offline"), tmp_path, {}, is_main=True, run_id="alert0")
    logger.alert("sftdist: disk space", "checkpoint: 1.0 MiB free on the file system of runs/a/checkpoints")
    logger.close()
    (run_file,) = tmp_path.rglob("*.wandb")
    assert b"checkpoint: 1.0 MiB free on the file system of runs/a/checkpoints" in run_file.read_bytes()
