"""Exact resume under real torch.distributed processes (CPU, gloo): stopped by a signal and resumed on the same
topology (bitwise), on another topology (2 -> 1, 1 -> 2 with DCP's resharding), refused where DeepSpeed cannot
reshard, and a rank killed with SIGKILL under ``torchrun --max-restarts=1``. Scenarios: scenarios.py."""

from __future__ import annotations

import json
import os
import random
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
    REPO,
    adapter_weights,
    bitwise_equal,
    compose,
    final_weights,
    fit_and_close,
    max_relative_difference,
    read_metrics,
    record_sample_steps,
)
from launching import launch_scenarios, load_scenarios, scenario_ok, torchrun_env
from sftdist.run.export import export_checkpoint
from sftdist.run.layout import MARKER
from sftdist.run.signals import STOPPED_FILE
from sftdist.training import Trainer

scenarios = load_scenarios()


@pytest.mark.parametrize("strategy", scenarios.STRATEGIES)
def test_a_run_stopped_by_a_signal_and_resumed_equals_the_uninterrupted_run(launched, strategy):
    result = scenario_ok(launched[2][f"resume/{strategy}"])
    # Rank 0 alone got SIGUSR1 during step 3; both ranks stopped after it, with a checkpoint of step 3.
    assert (result["stopped_by"], result["stop_step"], result["start_step"]) == ("SIGUSR1", 3, 3)
    assert result["resumed_from"].endswith("checkpoints/step_3")
    assert [step for step, _ in result["samples"]] == [0, 1, 2, 3]  # every step once, none repeated or skipped
    straight, stopped = Path(result["straight"]), Path(result["stopped"])
    ours, theirs = read_metrics(stopped), read_metrics(straight)
    assert [m["step"] for m in ours] == [1, 2, 3, 4]  # one row per step: appended after the resume
    assert [m["train/loss"] for m in ours] == [m["train/loss"] for m in theirs]  # identical, not close
    a, b = final_weights(stopped), final_weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in b), strategy  # bitwise
    # keep=2: the stop's checkpoint and the last one; step 2 was removed once a newer one was complete
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["step_3", "step_4"]
    assert all((stopped / "checkpoints" / name / MARKER).is_file() for name in ("step_3", "step_4"))


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_a_lora_run_stopped_and_resumed_equals_the_uninterrupted_run_with_checkpoints_of_adapters(launched, strategy):
    result = scenario_ok(launched[2][f"lora_resume/{strategy}"])
    assert (result["stopped_by"], result["start_step"]) == ("SIGUSR1", 3)
    straight, stopped = Path(result["straight"]), Path(result["stopped"])
    assert [m["train/loss"] for m in read_metrics(stopped)] == [m["train/loss"] for m in read_metrics(straight)]
    assert bitwise_equal(adapter_weights(stopped), adapter_weights(straight))
    # Each checkpoint holds the adapters, their fp32 masters and AdamW moments: a few times the adapters' bytes, a
    # small part of what the frozen base would take.
    adapter_bytes = sum(v.numel() * 4 for v in adapter_weights(straight).values())
    state = stopped / "checkpoints" / "step_3" / "state"
    size = sum(f.stat().st_size for f in state.rglob("*") if f.is_file())
    base_bytes = sum(v.numel() * 4 for v in load_file(str(straight / "final_merged" / "model.safetensors")).values())
    print(f"{strategy} LoRA checkpoint: {size} bytes, adapters {adapter_bytes}, base {base_bytes}")
    assert 3 * adapter_bytes <= size < 4 * adapter_bytes and size < 0.5 * base_bytes
    exported = export_checkpoint(stopped / "checkpoints" / "step_4", stopped / "exported")
    assert bitwise_equal(load_file(str(exported / "adapter_model.safetensors")), adapter_weights(stopped))


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_the_export_of_the_last_checkpoint_equals_final(launched, strategy, tmp_path):
    stopped = Path(scenario_ok(launched[2][f"resume/{strategy}"])["stopped"])
    out = export_checkpoint(stopped / "checkpoints" / "step_4", tmp_path / "exported")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (stopped / "final" / name).read_bytes(), name
    weights = load_file(str(out / "model.safetensors"))
    assert weights and all(w.numel() > 0 for w in weights.values())  # ZeRO-3's empty-save bug cannot ship


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_a_checkpoint_of_two_processes_resumes_on_one(launched, single_resume_reference, tmp_path, strategy):
    """2 -> 1: DCP reshards; the sample stream continues with no sample repeated or skipped."""
    out, data, results = launched
    first = scenario_ok(results[f"resume/{strategy}"])
    shutil.copytree(Path(first["stopped"]) / "checkpoints" / "step_3", tmp_path / "checkpoints" / "step_3")
    trainer = Trainer(compose(*scenarios.common(out, data), *scenarios.RESUME, f"output_dir={tmp_path}"))
    assert trainer.start_step == 3 and trainer.strategy.world_size == 1
    samples = record_sample_steps(trainer)
    fit_and_close(trainer)
    reference_dir, reference_samples = single_resume_reference
    two_then_one = [(s, i) for s, i in first["samples"] if s < 3] + [tuple(x) for x in samples]
    assert [tuple(x) for x in two_then_one] == [tuple(x) for x in reference_samples]
    # FACTS: fsdp2 on 2 processes ends within 1.3e-5 of one process after 3 steps (summation order)
    assert max_relative_difference(final_weights(tmp_path), final_weights(reference_dir)) < 1e-4


def test_a_checkpoint_of_one_process_resumes_on_two_fsdp2_processes(launched, single_resume_reference):
    result = scenario_ok(launched[2]["one_to_two"])
    reference_dir, reference_samples = single_resume_reference
    assert result["start_step"] == 3 and [tuple(x) for x in result["samples"]] == [tuple(reference_samples[3])]
    assert max_relative_difference(final_weights(result["output_dir"]), final_weights(reference_dir)) < 1e-4


def test_a_ddp_checkpoint_resumes_with_fsdp2(launched, single_resume_reference):
    result = scenario_ok(launched[2]["ddp_to_fsdp2"])
    reference_dir, reference_samples = single_resume_reference
    assert result["start_step"] == 3 and [tuple(x) for x in result["samples"]] == [tuple(reference_samples[3])]
    assert max_relative_difference(final_weights(result["output_dir"]), final_weights(reference_dir)) < 1e-4


def test_zero3_refuses_a_checkpoint_of_another_world_size_and_says_what_to_do(launched):
    out, data, _ = launched
    results = launch_scenarios(out, data, "--standalone", "--nproc_per_node=1", only="zero3_on_one", timeout=300)
    message = scenario_ok(results["zero3_on_one"])["message"]
    assert "written by strategy=zero3 on 2 processes, and its format (deepspeed) loads on 2 only (this run has 1)" in (
        message
    )
    assert "resume on 2 processes, or export it (sftdist-export" in message
    assert not (out / "zero3-on-one").exists()


def test_a_rank_killed_by_sigkill_restarts_and_ends_with_the_uninterrupted_weights(launched):
    """``kill -9`` of rank 1 at a random step: torchrun restarts both ranks, which resume from the newest complete
    checkpoint (step 2) and end bitwise where the uninterrupted 2-process run ends. On zero3, DeepSpeed's own
    checkpoint format; what the restart does is the same for every strategy (the newest complete checkpoint), and
    fsdp2's exact resume from its format is resume/fsdp2's (test_a_run_stopped_by_a_signal_and_resumed_...)."""
    strategy = "zero3"
    out, data, results = launched
    kill_step = random.choice([3, 4])
    print(f"{strategy}: rank 1 is killed after step {kill_step}")
    crashed = launch_scenarios(
        out,
        data,
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        only="crash",
        SFTDIST_TEST_KILL_STEP=str(kill_step),
        SFTDIST_TEST_STRATEGY=strategy,
        # As launch/torchrun.sh sets it: without it the restarted ranks may read the dead ones' addresses from
        # torchrun's store and hang or fail to connect (pytorch/pytorch#135712; 2 restarts in 3 here).
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
    )
    result = scenario_ok(crashed["crash"])
    assert result["attempt"] == 1, "the kill did not happen"
    assert result["start_step"] == 2 and result["resumed_from"].endswith("checkpoints/step_2")
    assert "failed (exitcode: -9) local_rank: 1" in crashed["_stderr"]  # killed by SIGKILL, then restarted
    run, straight = Path(result["output_dir"]), Path(scenario_ok(results[f"resume/{strategy}"])["straight"])
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3, 4]
    a, b = final_weights(run), final_weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in b)


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _wait_for_rows(run: Path, rows: int, proc: subprocess.Popen) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= rows):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)


def test_stop_signals_through_launch_torchrun_sh(launched, tmp_path):
    """What a scheduler does, through the launcher users run: (1) a worker alone gets SIGUSR1 under MAX_RESTARTS=1:
    the ranks stop together after a checkpoint, and torchrun's restart stops again instead of training on;
    (2) torchrun itself gets SIGTERM and forwards it: the workers checkpoint and exit 75; (3) the same command
    finishes the run, bitwise where the uninterrupted run ends."""
    out, data, _ = launched
    args = [*scenarios.common(out, data), "strategy=ddp", "train.max_steps=10", "checkpoint.every_steps=2"]
    run = tmp_path / "run"

    def launch(output_dir: Path, **env: str) -> subprocess.Popen:
        return subprocess.Popen(
            [str(REPO / "launch" / "torchrun.sh"), *args, f"output_dir={output_dir}"],
            cwd=REPO,  # torchrun -m sftdist.train with the repository root first on sys.path, as users start it
            env=torchrun_env(NPROC_PER_NODE="2", PYTHON=sys.executable, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stopped() -> dict:
        return json.loads((run / STOPPED_FILE).read_text())

    straight = launch(tmp_path / "straight")  # (alongside the first interrupted launch: the reference, at the end)
    first = launch(run, MAX_RESTARTS="1")
    _wait_for_rows(run, 2, first)
    os.kill(_children(first.pid)[0], signal.SIGUSR1)  # torchrun.sh exec'ed torchrun: its children are the workers
    _, err = first.communicate(timeout=600)
    assert first.returncode != 0 and "failed (exitcode: 75)" in err
    assert "stopped earlier in this launch by SIGUSR1; not training on" in err  # the restart did not train on
    k = stopped()["step"]
    assert stopped()["signal"] == "SIGUSR1" and k < 10 and (run / "checkpoints" / f"step_{k}" / MARKER).is_file()
    assert [m["step"] for m in read_metrics(run)] == list(range(1, k + 1))

    second = launch(run)
    _wait_for_rows(run, k + 1, second)
    second.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to the workers
    _, err = second.communicate(timeout=600)
    assert second.returncode != 0 and "Received 15 death signal, shutting down workers" in err, err[-3000:]
    assert err.count("sftdist: SIGTERM: finishing this step, then writing a checkpoint") == 2  # forwarded to both
    j = stopped()["step"]
    assert stopped()["signal"] == "SIGTERM" and k < j < 10 and (run / "checkpoints" / f"step_{j}" / MARKER).is_file()

    assert straight.wait(timeout=600) == 0, straight.communicate()[1][-3000:]
    third = launch(run)
    _, err = third.communicate(timeout=600)
    assert third.returncode == 0, err[-3000:]
    assert not (run / STOPPED_FILE).exists()
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 11))
    a, b = final_weights(run), final_weights(tmp_path / "straight")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("difficulty", ["meta", "model_loss"])
def test_the_curriculum_draws_the_same_stream_on_two_processes_as_on_one(launched, tmp_path, difficulty):
    """The samples of every step, the buckets (model_loss scored by both ranks, each its share, gathered) and the
    weights are those of one process."""
    out, data, results = launched
    result = scenario_ok(results[f"curriculum/{difficulty}"])
    overrides = (
        *scenarios.common(out, data),
        *scenarios.RESUME,
        "curriculum=three_phase",
        f"curriculum.difficulty={difficulty}",
        f"data.cache_dir={tmp_path / 'cache'}",  # scored afresh
        f"output_dir={tmp_path / 'one'}",
    )
    trainer = Trainer(compose(*overrides))
    samples = record_sample_steps(trainer)
    fit_and_close(trainer)
    assert trainer.checkpointer.row_buckets.tolist() == result["buckets"] and len(set(result["buckets"])) == 3
    assert [tuple(x) for x in result["samples"]] == [tuple(x) for x in samples]
    assert max_relative_difference(final_weights(result["output_dir"]), final_weights(tmp_path / "one")) < 1e-4
