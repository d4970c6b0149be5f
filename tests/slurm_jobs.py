"""Submitting and watching jobs on a real Slurm cluster (tests/slurm), importable as ``slurm_jobs``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO

SBATCH = REPO / "slurm" / "sft.sh"
CURRICULUM = REPO / "slurm" / "curriculum.sh"
# Two "nodes" of the local cluster, one process each, no GPU (the templates ask for 8 per node by default).
RESOURCES = ("--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1")


def cluster_problem() -> str | None:
    """Why no two-node cluster can take jobs here, or None."""
    if shutil.which("sbatch") is None:
        return "no sbatch (start a local cluster: sudo slurm/local_cluster.sh)"
    up = subprocess.run(["sinfo", "-h", "-N", "-t", "idle,mix,alloc", "-o", "%N"], capture_output=True, text=True)
    if up.returncode != 0 or len(set(up.stdout.split())) < 2:
        return f"no two-node Slurm cluster is up (sudo slurm/local_cluster.sh): {up.stderr.strip() or up.stdout}"
    return None


def job_env(**extra: str) -> dict:
    """What a job sees (sbatch exports the submitting environment): the checkout, one process per node, a cache
    of the test session's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    return {**env, "SFTDIST_HOME": str(REPO), "VENV": sys.prefix, "NPROC_PER_NODE": "1", **extra}


def submit(cwd: Path, *args: str, **env: str) -> str:
    """``sbatch --parsable [args]`` from ``cwd`` (the submit directory, where the log lands): the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=job_env(**env), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, StartTime, ...)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def finished(job_id: str) -> bool:
    return job(job_id)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def log_of(cwd: Path, name: str, job_id: str) -> str:
    return (cwd / f"slurm-{name}-{job_id}.out").read_text()


def rows(run: Path) -> int:
    """Steps logged so far in ``run``'s metrics.jsonl."""
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def training_processes(run: Path) -> list[int]:
    """PIDs of the training workers (not torchrun) writing into ``run``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"sftdist.train" in argv and f"output_dir={run}".encode() in argv and b"torch.distributed.run" not in argv:
            pids.append(int(proc.name))
    return pids
