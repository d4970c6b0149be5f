"""The checkpoint directory protocol (markers, torn and corrupt checkpoints, pruning), RNG states, the run identity,
metrics on resume, weights-only loading and the export's weight check, on small stand-ins."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from sftdist.metrics.trackers import JsonlTracker
from sftdist.run.checkpoint import (
    CheckpointError,
    _publish,
    capture_rng,
    latest_checkpoint,
    problem,
    prune,
    resolve_resume,
    restore_rng,
)
from sftdist.run.identity import identity_differences
from sftdist.run.layout import MARKER, STATE_FILE

_STATE = {"world_size": 1, "strategy": {"name": "none", "format": "dcp"}, "identity": {}, "config": {}}


def _checkpoint(root, step, complete=True):
    """A checkpoint directory as save_checkpoint leaves it (two small files), complete or torn."""
    tmp = root / f".tmp-step_{step}"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "shard.bin").write_bytes(b"x" * (100 + step))
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, **_STATE}))
    if complete:
        _publish(tmp, root / f"step_{step}", step)
    else:
        tmp.rename(root / f"step_{step}")
    return root / f"step_{step}"


def test_a_published_checkpoint_lists_its_files_and_sizes_and_is_complete(tmp_path):
    path = _checkpoint(tmp_path, 3)
    marker = json.loads((path / MARKER).read_text())
    assert marker == {"step": 3, "files": {"state/shard.bin": 103, STATE_FILE: len(json.dumps({"step": 3, **_STATE}))}}
    assert problem(path) is None and not list(tmp_path.glob(".tmp-*"))


def test_torn_and_corrupt_checkpoints_are_named_with_the_reason(tmp_path):
    assert problem(_checkpoint(tmp_path, 1, complete=False)) == "it has no COMPLETE marker (its write was interrupted)"
    cut = _checkpoint(tmp_path, 2)
    (cut / "state" / "shard.bin").write_bytes(b"x" * 10)
    assert problem(cut) == "state/shard.bin has 10 bytes where 102 were written"
    gone = _checkpoint(tmp_path, 3)
    (gone / "state" / "shard.bin").unlink()
    assert problem(gone) == "state/shard.bin is missing"
    garbled = _checkpoint(tmp_path, 4)
    (garbled / MARKER).write_text("{not json")
    assert problem(garbled).startswith("its COMPLETE marker or trainer_state.json is unreadable (JSONDecodeError")


def test_the_newest_complete_checkpoint_is_found_and_newer_broken_ones_are_skipped_with_a_warning(tmp_path, caplog):
    _checkpoint(tmp_path, 2)
    good = _checkpoint(tmp_path, 10)  # numeric order, not 10 < 2 as text
    torn = _checkpoint(tmp_path, 12, complete=False)
    (tmp_path / ".tmp-step_14").mkdir()
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(tmp_path) == good
    assert f"skipping {torn}: it has no COMPLETE marker" in caplog.text
    assert f"ignoring {tmp_path / '.tmp-step_14'}" in caplog.text
    assert latest_checkpoint(tmp_path / "absent") is None


def test_resume_settings_resolve_to_a_checkpoint_or_say_why_not(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    good = _checkpoint(run / "checkpoints", 4)
    assert resolve_resume("auto", run) == good and resolve_resume("never", run) is None
    assert resolve_resume(str(good), tmp_path / "elsewhere") == good and resolve_resume(str(run), tmp_path) == good
    torn = _checkpoint(run / "checkpoints", 6, complete=False)
    assert resolve_resume("auto", run) == good  # auto skips it
    with pytest.raises(CheckpointError, match=r"resume='.*step_6' is not a usable checkpoint: it has no COMPLETE"):
        resolve_resume(str(torn), run)  # a path names exactly what to resume: no fallback
    with pytest.raises(CheckpointError, match="is neither a checkpoint"):
        resolve_resume(str(tmp_path), run)
    assert resolve_resume("auto", tmp_path / "fresh") is None


def test_pruning_keeps_the_newest_complete_and_removes_older_torn_ones(tmp_path):
    for step in (2, 4, 6):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 5, complete=False)  # torn, older than the newest complete: useless
    (tmp_path / ".tmp-step_3").mkdir()
    prune(tmp_path, keep=2, newest=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_6"]
    prune(tmp_path, keep=1, newest=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_6"]


def test_pruning_never_removes_the_resumed_checkpoint_for_a_corrupt_or_abandoned_newer_one(tmp_path):
    """A run that resumed from step 2 (step 6 corrupt, or left behind by resume=PATH) and just wrote step 4: its
    own newest checkpoints stay, what lies after step 4 is not of its timeline and goes."""
    _checkpoint(tmp_path, 2)
    corrupt = _checkpoint(tmp_path, 6)
    (corrupt / "state" / "shard.bin").write_bytes(b"")
    _checkpoint(tmp_path, 8)  # complete, but of the timeline the run left
    _checkpoint(tmp_path, 4)
    prune(tmp_path, keep=1, newest=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step_4"


def test_auto_refuses_to_start_over_on_top_of_completed_checkpoints_it_cannot_read(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    broken = _checkpoint(root, 4)
    (broken / STATE_FILE).write_text("{}")
    _checkpoint(root, 6, complete=False)
    with pytest.raises(CheckpointError, match=r"completed but cannot be read now \(step_4; the warnings above"):
        resolve_resume("auto", tmp_path)
    (broken / MARKER).unlink()  # torn only (a first checkpoint killed while written): start fresh
    assert resolve_resume("auto", tmp_path) is None


def test_a_restart_by_torchrun_after_a_stop_signal_stops_again(tmp_path, monkeypatch):
    from sftdist.run.signals import STOPPED_FILE, record_stop, stopped_earlier_in_this_launch

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    record_stop(tmp_path, "SIGUSR1", 3, tmp_path / "checkpoints" / "step_3")
    assert json.loads((tmp_path / STOPPED_FILE).read_text())["exit_status"] == 75
    assert stopped_earlier_in_this_launch(tmp_path) is None  # the first attempt: the launch itself
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert stopped_earlier_in_this_launch(tmp_path) == "SIGUSR1"  # its restart: stop again
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-2")
    assert stopped_earlier_in_this_launch(tmp_path) is None  # another launch (a requeued job) trains


def test_rng_states_round_trip_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)  # move them off their seeds
    states = json.loads(json.dumps(capture_rng()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(states)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_identity_differences_name_the_keys_and_allow_moved_files(caplog):
    saved = {"data.path": "/a/chat.jsonl", "data fingerprint": "f1", "seed": 0, "model.num_layers": 4}
    assert identity_differences(saved, dict(saved)) == []
    with caplog.at_level("WARNING"):
        assert identity_differences(saved, {**saved, "data.path": "/scratch/chat.jsonl"}) == []
    assert (
        "moved inputs (their content is unchanged): data.path '/a/chat.jsonl' -> '/scratch/chat.jsonl'" in caplog.text
    )
    assert identity_differences(saved, {**saved, "data.path": "/b.jsonl", "data fingerprint": "f2"}) == [
        "data fingerprint 'f1' -> 'f2'",
        "data.path '/a/chat.jsonl' -> '/b.jsonl'",
    ]
    assert identity_differences(saved, {**saved, "model.num_layers": 2, "seed": 1}) == [
        "model.num_layers 4 -> 2",
        "seed 0 -> 1",
    ]
    # A key that came after the checkpoint was written: its default is what that run had
    assert identity_differences(saved, {**saved, "data.mixing_temperature": 1.0}) == []
    assert identity_differences(saved, {**saved, "data.mixing_temperature": 2.0}) == [
        "data.mixing_temperature 1.0 -> 2.0"
    ]


def test_metrics_of_a_resumed_run_keep_the_rows_up_to_its_step_and_append(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in range(1, 6)]
    path.write_text("\n".join(rows) + '\n{"step": 6, "train/lo')  # the last row cut short by a kill
    tracker = JsonlTracker(path, resume_step=3)
    tracker.log({"train/loss": 0.3}, step=4)
    tracker.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert path.read_text().splitlines()[:3] == rows[:3]  # kept as written
    JsonlTracker(path).close()  # a fresh run starts a fresh file
    assert path.read_text() == ""


def test_loads_inside_deepspeed_checkpoints_are_weights_only(tmp_path):
    """DeepSpeed asks torch.load for weights_only=False; under weights_only_loads() it gets tensors and plain data
    only: a pickle that would run code is refused."""
    pytest.importorskip("deepspeed")
    from sftdist.parallel.deepspeed import weights_only_loads

    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "plain.pt")
    torch.save({"hook": print}, tmp_path / "code.pt")  # unpickling it would import and return a callable
    with weights_only_loads():
        assert torch.load(tmp_path / "plain.pt", weights_only=False)["step"] == 3
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(tmp_path / "code.pt", weights_only=False)
    assert torch.load(tmp_path / "code.pt", weights_only=False)["hook"] is print  # outside it, as asked


def test_the_export_refuses_weights_that_do_not_match_the_config():
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftdist.run.export import ExportError, check_weights

    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    weights = {k: torch.zeros(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    assert check_weights(skeleton, weights) is weights
    del weights["lm_head.weight"]  # tied to the embedding: given once is enough
    assert check_weights(skeleton, weights) is weights
    empty = {**weights, "model.norm.weight": torch.zeros(0)}  # what ZeRO-3's empty saves look like
    with pytest.raises(ExportError, match=r"model.norm.weight is empty \(the config says shape \(16,\)\)"):
        check_weights(skeleton, empty)
    with pytest.raises(ExportError, match=r"model.layers.0.mlp.up_proj.weight has shape \(4, 16\); the config says"):
        check_weights(skeleton, {**weights, "model.layers.0.mlp.up_proj.weight": torch.zeros(4, 16)})
    missing = {k: v for k, v in weights.items() if k != "model.embed_tokens.weight"}
    with pytest.raises(ExportError, match="model.embed_tokens.weight is missing"):
        check_weights(skeleton, missing)


def test_sftdist_never_unpickles_without_weights_only():
    """Every torch.load of our own says weights_only=True (DeepSpeed's own loads: weights_only_loads above)."""
    import re

    from helpers import REPO

    calls = [
        (path, line)
        for path in (REPO / "sftdist").rglob("*.py")
        for line in path.read_text().splitlines()
        if re.search(r"\btorch\.load\(", line)
    ]
    assert all("weights_only=True" in line for _, line in calls), calls
