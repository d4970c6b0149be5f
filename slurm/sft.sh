#!/usr/bin/env bash
# sftdist: one training run as one Slurm job. One torchrun agent per node (srun), each starting one process per GPU,
# all joining one c10d rendezvous on the first node: the same launch/torchrun.sh and sftdist-train as a local run.
#
#     sbatch slurm/sft.sh model.name_or_path=/models/m data.path=chat.jsonl strategy=fsdp2 precision=bf16
#     sbatch --nodes=2 --time=2-00:00:00 slurm/sft.sh recipe=qwen2.5-7b-zero3 model.name_or_path=... data.path=...
#
# Arguments are sftdist-train's Hydra overrides, passed through unchanged; #SBATCH defaults below are overridden
# on the sbatch command line (sbatch --nodes=4 ...). Run sbatch from the sftdist checkout (or set SFTDIST_HOME).
#
# Environment (each optional):
#   SFTDIST_HOME   the sftdist checkout             (the directory sbatch was run from)
#   VENV           its virtual environment          ($SFTDIST_HOME/.venv, as `make` creates it)
#   MAX_REQUEUES   requeues after a stop signal     (10); past it, the job ends with exit status 75
#   REQUEUE        1: requeue after a stop signal   (1; 0, or no scontrol: exit 75 and let a chained job continue)
# Output directory: output_dir=... when given; else runs/<job name>-<job id> under the submit directory. A
# requeued job keeps its id, so it resumes into the same directory.
#
# Preemption and time limits: Slurm sends SIGUSR1 to this batch shell (--signal=B:USR1@600, ten minutes before the
# time limit; `scancel --signal=USR1 --batch JOBID` does the same by hand). The trap forwards it to the training
# processes only (through srun and torchrun); they finish the current step, write a checkpoint and exit 75; then
# this script requeues the job (`scontrol requeue`), which starts again later and resumes from that checkpoint.
# `scancel --signal=TERM --batch JOBID` stops the same way without a requeue. (A plain `scancel JOBID` ends the job
# at once: Slurm signals every process and srun kills its tasks, with no time for a checkpoint.)
# Any other failure is not requeued: the job ends FAILED with the error in its log.
#
# ---- job -------------------------------------------------------------------------------------------------------
#SBATCH --job-name=sftdist
#SBATCH --output=slurm-%x-%j.out      # the log, in the submit directory (%x: job name, %j: job id)
# ---- resources (per node) --------------------------------------------------------------------------------------
#SBATCH --nodes=1                     # nodes; sbatch --nodes=N for more (each runs one torchrun agent)
#SBATCH --ntasks-per-node=1           # one torchrun agent per node: it starts the per-GPU processes itself
#SBATCH --gpus-per-node=8             # GPUs per node = training processes per node
#SBATCH --cpus-per-task=32            # CPU cores for the agent and its workers (data loading, tokenization)
#SBATCH --mem=0                       # all of the node's memory
#SBATCH --time=24:00:00               # wall-clock limit; a longer run continues in requeued jobs
##SBATCH --partition=gpu              # (uncomment and name your cluster's partition / account / QOS)
##SBATCH --account=my-project
##SBATCH --exclusive                  # whole nodes: no other job's traffic on the node's network and caches
# ---- preemption and time limits --------------------------------------------------------------------------------
#SBATCH --requeue                     # the job may be requeued (by this script after a stop, by Slurm on node failure)
#SBATCH --open-mode=append            # a requeued job appends to the same log instead of truncating it
#SBATCH --signal=B:USR1@600           # SIGUSR1 to this shell 600 s before the time limit: more than the
                                      # checkpoint.stop_timeout_s (300 s) a stop may take, with room for Slurm's
                                      # up-to-60 s signal granularity
set -euo pipefail

die() { echo "slurm/sft.sh: $*" >&2; exit 2; }
say() { echo "slurm/sft.sh: $(date '+%F %T'): $*" >&2; }

# ---- stop signals: forwarded to the training processes only; after their checkpoint, a requeue ------------------
stop_signal=""  # the first one
signals=0
srun_pid=""
# srun passes SIGUSR1 on to every task (torchrun, which passes it to the workers); a SIGTERM it would turn into
# SIGKILL ("forcing job termination"). So whichever signal came, the training processes get SIGUSR1.
forward() {  # the trap: remember the signal, have the training processes stop at the end of their step
    stop_signal="${stop_signal:-$1}"
    signals=$((signals + 1))
    say "SIG$1 received; forwarding it to the training processes (they finish the step, checkpoint and stop)"
    [[ -z "$srun_pid" ]] || kill -s USR1 "$srun_pid" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM  # scancel --signal=TERM --batch: stop with a checkpoint, and no requeue

# ---- up-front checks: each fails in a second, before the training processes start ------------------------------
[[ -n "${SLURM_JOB_ID:-}" ]] || die "submit it with sbatch: sbatch slurm/sft.sh [overrides]"
SFTDIST_HOME="${SFTDIST_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}"
LAUNCH="$SFTDIST_HOME/launch/torchrun.sh"
[[ -x "$LAUNCH" ]] || die "no $LAUNCH: run sbatch from the sftdist checkout, or set SFTDIST_HOME to it"
VENV="${VENV:-$SFTDIST_HOME/.venv}"
PYTHON="$VENV/bin/python"
[[ -x "$PYTHON" ]] || die "no virtual environment at $VENV: run 'make setup' in $SFTDIST_HOME, or set VENV"
NNODES="${SLURM_JOB_NUM_NODES:-1}"
TASKS_PER_NODE="${SLURM_NTASKS_PER_NODE:-1}"
[[ "$TASKS_PER_NODE" == 1 ]] \
    || die "--ntasks-per-node=$TASKS_PER_NODE: keep 1 (one torchrun agent per node starts the per-GPU processes)"
MAX_REQUEUES="${MAX_REQUEUES:-10}"
REQUEUE="${REQUEUE:-1}"

overrides=("$@")
pinned=0
for arg in "$@"; do
    case "$arg" in output_dir=* | +output_dir=* | ++output_dir=*) pinned=1 ;; esac
done
if [[ "$pinned" == 0 ]]; then  # pinned to the job: a requeued job (same id) resumes into it
    overrides+=("output_dir=${SLURM_SUBMIT_DIR:-$PWD}/runs/${SLURM_JOB_NAME:-sftdist}-$SLURM_JOB_ID")
fi
NPROC="$("$LAUNCH" --print-nproc)"
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "launch/torchrun.sh found no process count (NPROC_PER_NODE='$NPROC')"
# The config, the files it names and the world size it gets: a mistake ends the job here, with sftdist-train's
# own one-line error. Its report names output_dir as the config resolves it (interpolations included).
report="$(WORLD_SIZE=$((NNODES * NPROC)) "$PYTHON" -m sftdist.train --check "${overrides[@]}")" || exit 2
echo "$report"
output_dir="$(sed -n 's/^sftdist-train: the config and its inputs are good (output_dir=\(.*\))$/\1/p' <<< "$report")"
[[ -n "$output_dir" ]] || die "sftdist-train --check named no output_dir"
[[ "$output_dir" == /* ]] || output_dir="$PWD/$output_dir"  # srun's tasks start in this same directory
mkdir -p "$output_dir" 2>/dev/null && [[ -w "$output_dir" ]] || die "output_dir=$output_dir is not writable"

# ---- networking (uncomment what your cluster needs; the defaults suit most InfiniBand clusters) -----------------
# export NCCL_SOCKET_IFNAME=ib0          # the interface NCCL bootstraps on (not docker0/lo); ^docker,lo excludes
# export NCCL_IB_HCA=mlx5                # the InfiniBand adapters to use (all mlx5_* ports)
# export NCCL_IB_DISABLE=1               # no InfiniBand: TCP sockets only (Ethernet clusters without RoCE)
# export NCCL_NET_GDR_LEVEL=PHB          # GPUDirect RDMA up to the PCIe host bridge
# export NCCL_DEBUG=WARN                 # INFO prints the chosen transport per peer (first thing to check when slow)
# export NCCL_ASYNC_ERROR_HANDLING=1     # a failed collective aborts instead of hanging until the timeout
# export FI_PROVIDER=efa                 # AWS EFA (with the aws-ofi-nccl plugin)
# export GLOO_SOCKET_IFNAME=ib0          # the same for gloo (CPU collectives, CPU offload)

# ---- the training processes, started once: one torchrun agent per node -----------------------------------------
say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s), output_dir=$output_dir"
status=0
started=0
stopped="$output_dir/stopped.json"  # written by the run after its stop checkpoint
rm -f "$stopped"  # (one left by an earlier job must not pass for this one's)
if [[ -z "$stop_signal" ]]; then  # (a signal during the checks: nothing started, nothing to stop)
    started=1
    # --cpus-per-task: since Slurm 22.05 srun does not inherit sbatch's (one core for all the workers otherwise).
    # --kill-on-bad-exit: a node whose agent fails ends the others at once, rather than their waiting out the
    # collective timeout (after a stop, every rank has closed its files before any exits: nothing is cut short).
    srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 \
        env PYTHON="$PYTHON" "$LAUNCH" "${overrides[@]}" &
    srun_pid=$!
    [[ -z "$stop_signal" ]] || kill -s USR1 "$srun_pid"  # (a signal between the start and the line above)
    while :; do  # a trap interrupts `wait`: wait again until srun has really ended
        seen="$signals"
        status=0
        wait "$srun_pid" || status=$?
        [[ "$signals" != "$seen" ]] || break
    done
    srun_pid=""
fi

# ---- the outcome ------------------------------------------------------------------------------------------------
if [[ "$started" == 1 && "$status" == 0 ]]; then
    if [[ -d "$output_dir/final" ]]; then
        say "training finished: $output_dir/final"
    else
        say "this job's share of the run is done (train.stop_after_step): the next job continues it"
    fi
    exit 0
fi
if [[ "$started" == 1 && ( -z "$stop_signal" || ! -f "$stopped" ) ]]; then
    say "training failed (srun exit status $status): not requeued; the error is above"
    exit "$status"
fi
[[ -f "$stopped" ]] && say "stopped with a checkpoint: $(tr -d '\n' < "$stopped")"
if [[ "$stop_signal" != USR1 || "$REQUEUE" != 1 ]]; then
    exit 75
fi
if ! command -v scontrol >/dev/null 2>&1; then
    say "no scontrol here: not requeued; a job chained after this one (--dependency=singleton) resumes the run"
    exit 75
fi
if (( ${SLURM_RESTART_COUNT:-0} >= MAX_REQUEUES )); then
    say "requeued ${SLURM_RESTART_COUNT:-0} times already (MAX_REQUEUES=$MAX_REQUEUES): not again"
    exit 75
fi
say "requeueing job $SLURM_JOB_ID: it resumes from the checkpoint when it starts again"
scontrol requeue "$SLURM_JOB_ID" || say "scontrol requeue failed (a job submitted with --no-requeue?): not requeued"
exit 75  # (after a requeue Slurm ends this script before it gets here)
