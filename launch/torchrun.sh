#!/usr/bin/env bash
# Start sftdist-train on this node under torchrun: one agent per node, NPROC_PER_NODE processes each.
# The Slurm scripts run it once per node (srun --ntasks-per-node=1); by hand on one node:
#     launch/torchrun.sh strategy=fsdp2 model.name_or_path=/models/m data.path=chat.jsonl
# and on two nodes, the same command on each with NNODES=2 MASTER_ADDR=<first node>.
#
# Environment (each optional; under Slurm the defaults come from the job):
#   NNODES          nodes in the job step        ($SLURM_STEP_NUM_NODES, $SLURM_NNODES, else 1)
#   NPROC_PER_NODE  processes on this node       (GPUs in $CUDA_VISIBLE_DEVICES, else nvidia-smi's, else 1)
#   MASTER_ADDR     the rendezvous host          (first node of the step's/job's node list (its NodeAddr), else
#                                                127.0.0.1)
#   MASTER_PORT     the rendezvous port          (20000 + $SLURM_JOB_ID % 10000, else 29500)
#   RDZV_ID         the job's rendezvous id      ($SLURM_JOB_ID, else sftdist)
#   PYTHON          the interpreter with sftdist (python3)
#   SHUTDOWN_TIMEOUT seconds torchrun gives the workers after a stop signal before SIGKILL (330)
#   MAX_RESTARTS    times torchrun restarts the workers after one fails (0); they resume from the newest
#                   complete checkpoint, and a restart after a stop signal stops again
# Exit status: torchrun's own, 0 when training finished; after a stop signal the workers exit 75 and torchrun 1,
# and output_dir/stopped.json says which signal stopped the run and where its checkpoint is.
# Arguments are sftdist-train overrides. With NNODES=1 torchrun runs --standalone (a free local port).
set -euo pipefail

# Two agents on one GPU host (a rehearsal) need disjoint CUDA_VISIBLE_DEVICES, or both take GPU 0...
NNODES="${NNODES:-${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=1
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
        NPROC_PER_NODE="${#visible[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
        [[ "$gpus" -gt 0 ]] && NPROC_PER_NODE="$gpus"
    fi
fi
[[ "${1:-}" != --print-nproc ]] || { echo "$NPROC_PER_NODE"; exit 0; }  # for slurm/sft.sh's checks
if [[ -z "${MASTER_ADDR:-}" ]]; then
    MASTER_ADDR=127.0.0.1
    nodelist="${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}"
    if [[ -n "$nodelist" ]] && command -v scontrol >/dev/null 2>&1; then
        head_node="$(scontrol show hostnames "$nodelist" | head -n 1)"
        # The address Slurm itself reaches that node at (its NodeAddr: the node name on most clusters).
        MASTER_ADDR="$(scontrol show node -o "$head_node" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)"
        MASTER_ADDR="${MASTER_ADDR:-$head_node}"
    fi
fi
if [[ -z "${MASTER_PORT:-}" ]]; then  # per job: two jobs sharing a first node must not share a store
    MASTER_PORT=29500
    [[ -n "${SLURM_JOB_ID:-}" ]] && MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))
fi
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-sftdist}}"
PYTHON="${PYTHON:-python3}"
# A restarted worker group (torchrun --max-restarts) must not share torchrun's rendezvous store: it would read
# the previous attempt's addresses and hang or fail connecting (pytorch/pytorch#135712; seen here with gloo).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
# SIGUSR1 (Slurm's --signal) is forwarded to the workers like SIGTERM, and they get the time to write their
# checkpoint (checkpoint.stop_timeout_s, 300 s by default) before torchrun kills them; the workers read it too.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-330}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"

if [[ "$NNODES" == 1 ]]; then
    rendezvous=(--standalone)
else
    rendezvous=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID")
fi
echo "launch: $(hostname): ${NNODES} node(s) x ${NPROC_PER_NODE} process(es), rendezvous ${MASTER_ADDR}:${MASTER_PORT}" >&2
exec "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$NPROC_PER_NODE" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --max-restarts="$MAX_RESTARTS" \
    -m sftdist.train "$@"
