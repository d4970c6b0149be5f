"""``sbatch slurm/sft.sh`` and ``slurm/curriculum.sh`` on a real Slurm cluster: two nodes of the local cluster
(slurm/local_cluster.sh), one torchrun agent and one fsdp2 process on each, the demo with the three-phase
curriculum. All the jobs are submitted at once (the cluster runs what fits and queues the rest), then watched:

- straight: one job, start to end: the reference.
- preempted: SIGUSR1 to the batch shell after step 3 (``scancel --signal=USR1 --batch``, what ``--signal=B:USR1@600``
  does before the time limit) -> checkpoint -> ``scontrol requeue`` -> the job runs again and resumes.
- curriculum: slurm/curriculum.sh: one job per phase, each after the one before (afterok).
- crash: a training process killed with SIGKILL after step 2: the job fails and is not requeued.
- no_requeue: MAX_REQUEUES=0 and a stop signal: the job ends with the run's exit status 75, not requeued.
- terminated: ``scancel --signal=TERM --batch``: a stop with a checkpoint and no requeue (srun gets SIGUSR1: it
  would turn a SIGTERM into SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import bitwise_equal, final_weights, read_metrics
from slurm_jobs import (
    CURRICULUM,
    RESOURCES,
    SBATCH,
    finished,
    job,
    job_env,
    log_of,
    rows,
    submit,
    training_processes,
    wait_for,
)

DEMO = (
    "curriculum=three_phase",
    "strategy=fsdp2",
    "data.demo_size=400",
    "train.max_steps=10",  # phases end at steps 2, 6, 10
    "train.global_batch_size=16",
    "eval.every_steps=10",  # one eval, at the end (the jobs' bitwise ends are what is compared)
    "eval.before_training=false",
    "eval.probes.max_new_tokens=16",
    "wandb.mode=disabled",
)
WEIGHTS = [(0.9, 0.1, 0.0), (0.3, 0.5, 0.2), (0.1, 0.4, 0.5)]


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Submit every job, deliver the signals and the kill at their steps, wait for all to end. Returns
    (submit dir, {name: job id or ids}, {name: output_dir})."""
    cwd = tmp_path_factory.mktemp("slurm")
    env = {"SFTDIST_CACHE_DIR": str(cwd / "cache")}
    runs = {name: cwd / name for name in ("straight", "preempted", "curriculum", "crash", "no_requeue", "terminated")}

    def sft(name: str, *extra: str, **more_env: str) -> str:
        return submit(cwd, *RESOURCES, f"--job-name={name}", str(SBATCH), *DEMO, f"output_dir={runs[name]}", *extra,
                      **env, **more_env)  # fmt: skip

    ids: dict[str, str | list[str]] = {"straight": sft("straight"), "preempted": sft("preempted")}
    submitted = subprocess.run(
        [str(CURRICULUM), *DEMO, f"output_dir={runs['curriculum']}"],
        cwd=cwd,
        env=job_env(
            **env,
            JOB_NAME="phased",
            SBATCH_ARGS=" ".join(RESOURCES),
            PHASE2_SBATCH="--time=30",  # per-phase sbatch options
            PHASE3_ARGS="checkpoint.keep=3",  # and per-phase overrides (one that leaves the weights bitwise)
        ),
        capture_output=True,
        text=True,
    )
    assert submitted.returncode == 0, submitted.stderr
    ids["curriculum"] = submitted.stdout.split("\n")[-2].split()
    ids["curriculum_stdout"] = submitted.stdout
    ids["crash"] = sft("crash")
    ids["no_requeue"] = sft("no_requeue", MAX_REQUEUES="0")
    ids["terminated"] = sft("terminated")

    # Each event at its step, whichever job gets there first. Slurm holds a requeued job for ~2 minutes before it
    # is eligible again; StartTime=now ends that wait (the cluster's own delay, not part of what is tested).
    def preempt(name: str, signal_name: str = "USR1") -> None:
        subprocess.run(["scancel", f"--signal={signal_name}", "--batch", ids[name]], check=True)

    def kill(name: str) -> None:
        victims = training_processes(runs[name])
        assert victims, f"no training process of the {name} job found"
        os.kill(victims[-1], signal.SIGKILL)

    def requeued(name: str) -> bool:
        return job(ids[name])["Restarts"] == "1"

    def start_now(name: str) -> None:  # (no check: a job the cluster started meanwhile refuses the update)
        subprocess.run(["scontrol", "update", f"JobId={ids[name]}", "StartTime=now"], check=False)

    events = [
        (lambda: rows(runs["preempted"]) >= 3, lambda: preempt("preempted")),
        (lambda: rows(runs["no_requeue"]) >= 1, lambda: preempt("no_requeue")),
        (lambda: rows(runs["crash"]) >= 2, lambda: kill("crash")),
        (lambda: rows(runs["terminated"]) >= 2, lambda: preempt("terminated", "TERM")),
        (lambda: requeued("preempted"), lambda: start_now("preempted")),  # seen at once, while still pending
    ]

    def fire() -> bool:  # each event once its step is logged; True when all have fired
        for event in list(events):
            ready, act = event
            if ready():
                act()
                events.remove(event)
        return not events

    wait_for(fire, 900, "the steps of the signals and the kill, and the preempted job's requeue")
    everything = [ids[name] for name in runs if name != "curriculum"] + ids["curriculum"]
    wait_for(lambda: all(finished(j) for j in everything), 1200, "every job to end", poll=2)
    return cwd, ids, runs


def test_sbatch_trains_to_completion_with_the_log_in_the_jobs_output_file(jobs):
    cwd, ids, runs = jobs
    record = job(ids["straight"])
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "0")
    assert (runs["straight"] / "final" / "model.safetensors").is_file()
    log = log_of(cwd, "straight", ids["straight"])
    assert log.count("launch: ") == 2 and "2 node(s) x 1 process(es)" in log  # one torchrun agent per node
    assert "fsdp2 x 2 on cpu" in log and "step 10/10" in log and "training finished" in log
    assert [m["step"] for m in read_metrics(runs["straight"])] == list(range(1, 11))


def test_a_preempted_job_checkpoints_requeues_and_ends_bitwise_equal(jobs):
    cwd, ids, runs = jobs
    record = job(ids["preempted"])
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("COMPLETED", "0:0", "1")
    log = log_of(cwd, "preempted", ids["preempted"])  # --open-mode=append: both runs of the job in one file
    assert "SIGUSR1 received; forwarding it to the training processes" in log
    assert f"requeueing job {ids['preempted']}" in log and "(restart 1)" in log
    stop = log.index("requeueing job")
    assert "resuming from " in log[stop:] and "training finished" in log[stop:]
    ours, theirs = read_metrics(runs["preempted"]), read_metrics(runs["straight"])
    assert [m["step"] for m in ours] == list(range(1, 11))
    assert [m["train/loss"] for m in ours] == [m["train/loss"] for m in theirs]
    assert bitwise_equal(final_weights(runs["preempted"]), final_weights(runs["straight"]))


def test_a_crash_is_not_requeued_and_its_error_is_in_the_log(jobs):
    cwd, ids, runs = jobs
    record = job(ids["crash"])
    assert (record["JobState"], record["Restarts"]) == ("FAILED", "0")
    log = log_of(cwd, "crash", ids["crash"])
    assert "exitcode  : -9" in log  # torchrun's report of the killed worker
    assert "training failed (srun exit status" in log and "not requeued" in log
    assert not (runs["crash"] / "final").exists()


def test_requeues_are_bounded(jobs):
    cwd, ids, runs = jobs
    record = job(ids["no_requeue"])
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("FAILED", "75:0", "0")
    stopped = json.loads((runs["no_requeue"] / "stopped.json").read_text())
    assert stopped["signal"] == "SIGUSR1" and Path(stopped["checkpoint"]).is_dir()
    assert "(MAX_REQUEUES=0): not again" in log_of(cwd, "no_requeue", ids["no_requeue"])


def test_sigterm_to_the_batch_shell_stops_with_a_checkpoint_and_no_requeue(jobs):
    cwd, ids, runs = jobs
    record = job(ids["terminated"])
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("FAILED", "75:0", "0")
    stopped = json.loads((runs["terminated"] / "stopped.json").read_text())
    assert stopped["signal"] == "SIGUSR1" and Path(stopped["checkpoint"]).is_dir()  # what srun passed on
    log = log_of(cwd, "terminated", ids["terminated"])
    assert "SIGTERM received; forwarding it" in log and "forcing job termination" not in log
    assert "requeueing" not in log


def test_the_curriculum_runs_as_three_dependent_jobs_equal_to_one(jobs):
    cwd, ids, runs = jobs
    first, second, third = ids["curriculum"]
    assert ids["curriculum_stdout"].splitlines()[:3] == [
        f"phase 1: job {first}, steps 1-2",
        f"phase 2: job {second}, steps 3-6",
        f"phase 3: job {third}, steps 7-10",
    ]
    records = [job(j) for j in ids["curriculum"]]
    assert [r["JobState"] for r in records] == ["COMPLETED"] * 3
    assert records[1]["TimeLimit"] == "00:30:00"  # PHASE2_SBATCH
    for before, after in zip(records, records[1:]):  # in order: each started once the one before had ended
        assert after["StartTime"] >= before["EndTime"]
    assert "resuming from" not in log_of(cwd, "phased-p1", first)
    assert "this job's share of the run is done (train.stop_after_step)" in log_of(cwd, "phased-p1", first)
    for name, j, step in (("phased-p2", second, 2), ("phased-p3", third, 6)):
        assert f"checkpoints/step_{step}: step {step} of 10" in log_of(cwd, name, j)
    assert "checkpoint.keep 2 -> 3" in log_of(cwd, "phased-p3", third)  # PHASE3_ARGS
    metrics = read_metrics(runs["curriculum"])
    assert [m["data/phase"] for m in metrics] == [1] * 2 + [2] * 4 + [3] * 4
    for phase, weights in enumerate(WEIGHTS, start=1):
        phase_rows = [m for m in metrics if m["data/phase"] == phase]
        for name, weight in zip(("easy", "medium", "hard"), weights):
            assert abs(np.mean([m[f"data/frac_{name}"] for m in phase_rows]) - weight) <= 1 / 16  # one sample
    theirs = read_metrics(runs["straight"])
    assert [m["train/loss"] for m in metrics] == [m["train/loss"] for m in theirs]
    assert bitwise_equal(final_weights(runs["curriculum"]), final_weights(runs["straight"]))


def test_a_malformed_override_fails_in_the_checks_with_the_local_commands_error(cluster, tmp_path):
    local = subprocess.run(
        [
            str(Path(sys.executable).parent / "sftdist-train"),
            *DEMO,
            "train.max_steps=0",
            f"output_dir={tmp_path / 'x'}",
        ],
        capture_output=True,
        text=True,
    )
    assert local.returncode == 2 and local.stderr == "sftdist-train: config error: train.max_steps=0 must be > 0\n"
    job_id = submit(tmp_path, *RESOURCES, "--job-name=bad", str(SBATCH), *DEMO, "train.max_steps=0")
    wait_for(lambda: finished(job_id), 120, "the job to end")
    record = job(job_id)
    assert (record["JobState"], record["ExitCode"], record["Restarts"]) == ("FAILED", "2:0", "0")
    log = log_of(tmp_path, "bad", job_id)
    assert local.stderr in log and "launch: " not in log  # refused before any training process started


def test_curriculum_sh_refuses_a_phase_override_that_changes_the_run(cluster, tmp_path):
    refused = subprocess.run(
        [str(CURRICULUM), *DEMO, f"output_dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=job_env(PHASE2_ARGS="data.max_length=512", JOB_NAME="refused"),
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("sftdist-train: config error: phase 2's overrides change data.max_length 1024")
    names = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True, check=True).stdout
    assert "refused-p" not in names  # nothing was submitted
