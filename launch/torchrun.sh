#!/usr/bin/env bash
# Start sftdist-train on this node under torchrun: one agent per node, NPROC_PER_NODE processes each.
# The Slurm scripts run it once per node (srun --ntasks-per-node=1); by hand on one node:
#     launch/torchrun.sh strategy=fsdp2 model.name_or_path=/models/m data.path=chat.jsonl
# and on two nodes, the same command on each with NNODES=2 MASTER_ADDR=<first node>.
#
# Environment (each optional; under Slurm the defaults come from the job):
#   NNODES          nodes in the job             ($SLURM_NNODES, else 1)
#   NPROC_PER_NODE  processes on this node       (GPUs visible here, else 1)
#   MASTER_ADDR     the rendezvous host          (first node of $SLURM_JOB_NODELIST, else 127.0.0.1)
#   MASTER_PORT     the rendezvous port          (29500)
#   RDZV_ID         the job's rendezvous id      ($SLURM_JOB_ID, else sftdist)
#   PYTHON          the interpreter with sftdist (python3)
# Arguments are sftdist-train overrides. With NNODES=1 torchrun runs --standalone (a free local port).
set -euo pipefail

NNODES="${NNODES:-${SLURM_NNODES:-1}}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
        [[ "$gpus" -gt 0 ]] && NPROC_PER_NODE="$gpus"
    fi
fi
if [[ -z "${MASTER_ADDR:-}" ]]; then
    MASTER_ADDR=127.0.0.1
    if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null 2>&1; then
        MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    fi
fi
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-sftdist}}"
PYTHON="${PYTHON:-python3}"

if [[ "$NNODES" == 1 ]]; then
    rendezvous=(--standalone)
else
    rendezvous=(--nnodes="$NNODES" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID")
fi
echo "launch: $(hostname): ${NNODES} node(s) x ${NPROC_PER_NODE} process(es), rendezvous ${MASTER_ADDR}:${MASTER_PORT}" >&2
exec "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node="$NPROC_PER_NODE" -m sftdist.train "$@"
