#!/usr/bin/env bash
# sftdist: a curriculum run as one Slurm job per phase, each starting when the one before it succeeded
# (--dependency=afterok) and continuing from its checkpoint. Run it on the login node (not with sbatch):
#
#     slurm/curriculum.sh model.name_or_path=/models/m data.path=chat.jsonl strategy=fsdp2 train.max_steps=3000
#     PHASE3_SBATCH="--nodes=4 --time=2-00:00:00" PHASE3_ARGS="train.micro_batch_tokens=16384" slurm/curriculum.sh ...
#
# Arguments are sftdist-train overrides for every phase (curriculum=three_phase is added first; override it with
# another curriculum or curriculum.phases). Phase i's job trains steps (end of phase i-1, end of phase i] of the
# whole run (train.stop_after_step), into one output_dir; a preempted phase is requeued and resumes inside its
# phase, as any slurm/sft.sh job.
#
# Environment (each optional):
#   PHASE<i>_SBATCH  sbatch options of phase i's job (its nodes, time, partition, ...), e.g. "--nodes=2 --time=8:00:00"
#   PHASE<i>_ARGS    overrides of phase i's job only: what a resumed run may change (train.lr, the micro-batch token
#                    budget train.micro_batch_tokens, checkpoint.*, ...); one that would change the run itself
#                    (the model, the data, data.max_length, the schedule) is refused before anything is submitted.
#                    These three are split at white space (no quotes): a value cannot hold a space
#   SBATCH_ARGS      sbatch options of every phase's job
#   JOB_NAME         job names are <JOB_NAME>-p<i>       (sftdist-curriculum)
#   OUTPUT_DIR       the run's directory, unless output_dir=... is given (runs/<JOB_NAME>-<date>-<time>)
#   SFTDIST_HOME     the sftdist checkout               (the directory holding this script's slurm/)
#   VENV             its virtual environment            ($SFTDIST_HOME/.venv)
# Prints one line per phase (its job id and steps), then the job ids on the last line, to stdout.
set -euo pipefail

die() { echo "slurm/curriculum.sh: $*" >&2; exit 2; }

[[ -z "${SLURM_JOB_ID:-}" ]] || die "run it on the login node, not inside a job: it submits the phases' jobs itself"
SFTDIST_HOME="${SFTDIST_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
VENV="${VENV:-$SFTDIST_HOME/.venv}"
[[ -x "$VENV/bin/python" ]] || die "no virtual environment at $VENV: run 'make setup' in $SFTDIST_HOME, or set VENV"
command -v sbatch >/dev/null || die "no sbatch here: run it where Slurm's commands are"
JOB_NAME="${JOB_NAME:-sftdist-curriculum}"

overrides=(curriculum=three_phase "$@")
output_dir=""
for arg in "$@"; do
    case "$arg" in output_dir=* | +output_dir=* | ++output_dir=*) output_dir="${arg#*output_dir=}" ;; esac
done
if [[ -z "$output_dir" ]]; then  # one directory for every phase: each job continues the one before it
    output_dir="${OUTPUT_DIR:-runs/$JOB_NAME-$(date +%Y%m%d-%H%M%S)}"
    overrides+=("output_dir=$output_dir")
fi  # (a relative output_dir is relative to this directory, where every job starts: sbatch's submit directory)

# Each phase's end and its job's own overrides, every phase's config and inputs checked first (sftdist-train's
# errors). PHASE<i>_ARGS, PHASE<i>_SBATCH and SBATCH_ARGS are split at white space (no quoting, no globbing).
set -f
last=0
for var in $(compgen -v | grep -E '^PHASE[0-9]+_(ARGS|SBATCH)$' || true); do
    i="${var#PHASE}"
    i="${i%%_*}"
    ((i > last)) && last="$i"
done
phase_args=()
for ((i = 1; i <= last; i++)); do
    var="PHASE${i}_ARGS"
    phase_args+=(--phase "${!var:-}")
done
plan="$("$VENV/bin/python" -m sftdist.cli.phases ${phase_args[@]+"${phase_args[@]}"} "${overrides[@]}")" || exit 2
mapfile -t phases <<< "$plan"
((last <= ${#phases[@]})) || die "PHASE${last}_*: the curriculum has ${#phases[@]} phases"

export SFTDIST_HOME VENV  # the jobs find the checkout and its environment wherever sbatch runs them
# shellcheck disable=SC2206  # split at white space on purpose (set -f: no globbing)
common_sbatch=(${SBATCH_ARGS:-})
jobs=()
previous=""
start=0
for i in "${!phases[@]}"; do
    phase=$((i + 1))
    # shellcheck disable=SC2206
    line=(${phases[$i]})  # its last step, then its job's own overrides
    end="${line[0]}"
    sbatch_var="PHASE${phase}_SBATCH"
    # shellcheck disable=SC2206
    phase_sbatch=(${!sbatch_var:-})
    dependency=()
    [[ -z "$previous" ]] || dependency=("--dependency=afterok:$previous" --kill-on-invalid-dep=yes)
    previous="$(sbatch --parsable --job-name="$JOB_NAME-p$phase" ${dependency[@]+"${dependency[@]}"} \
        ${common_sbatch[@]+"${common_sbatch[@]}"} ${phase_sbatch[@]+"${phase_sbatch[@]}"} \
        "$SFTDIST_HOME/slurm/sft.sh" "${overrides[@]}" "${line[@]:1}")"
    previous="${previous%%;*}"  # --parsable prints "id" or "id;cluster"
    jobs+=("$previous")
    echo "phase $phase: job $previous, steps $((start + 1))-$end"
    start="$end"
done
echo "output_dir: $output_dir" >&2
echo "${jobs[*]}"
