#!/usr/bin/env bash
# The GPU tests and every GPU benchmark in one call of at most 8 minutes on one H100/H200. Every JSON line the
# benchmarks print, and one line per step ({"bench": "gpu_suite", "step", "rc", "seconds", ...}), goes to
# $OUT/gpu_suite.jsonl; everything printed goes to $OUT/gpu_suite.log ($OUT: ./gpu_suite_out when unset).
#
# The GPU machine's image has torch, transformers, triton and accelerate but not what tests/bench/gpu_wheels.sh
# gathers (hydra-core, omegaconf, datasets, trl, deepspeed, ...; no flash-attn: see that script) nor the
# benchmark's data. So, first here (a machine that reaches the package registry; ~37 MiB):
#
#     bash tests/bench/gpu_wheels.sh
#
# then one call of the device tool:
#
#     run(command="bash tests/bench/gpu_suite.sh", carry=[".whl", ".bench_data"], timeout_s=540)
#
# and its $OUT comes back with gpu_suite.jsonl and gpu_suite.log. On the machine the wheels are installed into
# /tmp/site (on PYTHONPATH) as the device notes say, and sftdist itself there too (pip install --no-deps --target:
# its kernels/ and conf/ install inside the package, which PYTHONPATH=. would not do).
#
# Steps, each with its own timeout (a failure or a timeout is logged, and the next step runs):
#   install    the wheels and sftdist into /tmp/site                                 <= 60 s
#   tests      pytest tests/gpu -q                                                   <= 90 s
#   loss       tests/bench/bench_loss_layer.py --device cuda                          <= 100 s
#   vs_trl     bench_vs_trl.py --device cuda --model llama1b, 2 + 4 steps            <= 120 s
#   dist_1b    bench_distributed_gpu.py --shapes 1b, none/fsdp2/zero3 on 1 GPU       <= 75 s
#   dist_8b    the same with --shapes 8b-4layers                                     <= 75 s
# and no step starts past BUDGET (480 s) from the start. zero3 is reported as skipped where deepspeed does not
# import; a run of bench_distributed_gpu.py that outlasts its --run-timeout is reported as such.
#
# Checking the plumbing without a GPU: every step in a tiny CPU configuration with the .venv (the wheels are not
# installed, sftdist is, into a temporary --target; the GPU tests skip; bench_loss_layer.py only parses --help, its
# CPU case alone taking minutes), ~4 minutes on 2 cores:
#
#     SFTDIST_GPU_SUITE_DRY=1 OUT=/tmp/gpu_suite_dry bash tests/bench/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=${SFTDIST_GPU_SUITE_DRY:-0}
OUT=${OUT:-./gpu_suite_out}
BUDGET=${BUDGET:-480}
mkdir -p "$OUT"
JSONL=$OUT/gpu_suite.jsonl
LOG=$OUT/gpu_suite.log
: >"$JSONL"
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
if [[ $DRY == 1 ]]; then
  PY=${PY:-.venv/bin/python} SITE=$(mktemp -d /tmp/gpu-suite-site-XXXXXX)
else
  PY=${PY:-python3} SITE=/tmp/site
fi
export DRY PY SITE
[[ -e build ]] && KEEP_BUILD=1 || KEEP_BUILD=0 # pip builds sftdist in-tree, into build/: removed after a dry run
START=$SECONDS

# step NAME MAX_SECONDS CMD...: CMD under timeout (at most what is left of the budget), its output into the log and
# its JSON lines into the JSONL, then the step's own line: exit status, seconds, last line of output.
step() {
  local name=$1 limit=$2 begin=$SECONDS rc=-1
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  ((limit > left)) && limit=$left
  : >"$OUT/step.log"
  if ((limit >= 15)); then
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
    timeout -k 10 "$limit" "$@" >"$OUT/step.log" 2>&1
    rc=$?
    cat "$OUT/step.log" >>"$LOG"
    grep '^{"' "$OUT/step.log" >>"$JSONL" # (not TRL's own log lines, Python dicts in single quotes)
  fi
  "$PY" - "$name" "$rc" "$((SECONDS - begin))" "$OUT/step.log" <<'PYEOF' | tee -a "$LOG" >>"$JSONL"
import json, pathlib, sys

name, rc, seconds, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4])
row = {"bench": "gpu_suite", "step": name}
if rc == -1:
    row["skipped"] = "out of time"
else:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    row.update(rc=rc, seconds=seconds, timed_out=rc in (124, 137), last_line=lines[-1][-300:] if lines else "")
print(json.dumps(row))
PYEOF
  rm -f "$OUT/step.log"
}

# The carried wheels (not in a dry run: they are CPython 3.12's, and the .venv has them all), then sftdist.
install_packages() {
  if [[ $DRY != 1 ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl ||
      return 1
  fi
  # PYTHONPATH: the carried setuptools builds sftdist (the image's may be older than 77, which refuses its license)
  PYTHONPATH=$SITE "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --upgrade --target "$SITE" . || return 1
  PYTHONPATH=$SITE PYTHONSAFEPATH=1 "$PY" -c "import sftdist.conf, sftdist.kernels, sftdist.trainer, torch, transformers, datasets, trl
print('sftdist from', sftdist.__file__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available(),
      '| transformers', transformers.__version__, '| trl', trl.__version__)"
}
export -f install_packages

step install 60 bash -c install_packages
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
[[ $DRY == 1 ]] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

# PYTHONSAFEPATH: the repository root not on sys.path, so that the tests import the installed sftdist (with its
# kernels/ and conf/), not the source folder.
step tests 90 env PYTHONSAFEPATH=1 "$PY" -m pytest tests/gpu -q -p no:cacheprovider

if [[ -f tests/bench/bench_loss_layer.py && $DRY == 1 ]]; then # (its CPU case alone takes minutes on 2 cores)
  step loss 60 "$PY" tests/bench/bench_loss_layer.py --help
elif [[ -f tests/bench/bench_loss_layer.py ]]; then
  step loss 100 "$PY" tests/bench/bench_loss_layer.py --device cuda
else
  echo '{"bench": "gpu_suite", "step": "loss", "skipped": "tests/bench/bench_loss_layer.py is absent"}' |
    tee -a "$LOG" >>"$JSONL"
fi

if [[ $DRY == 1 ]]; then
  step vs_trl 300 "$PY" tests/bench/bench_vs_trl.py --device cpu --model tiny --steps 1 --records 32 \
    --runs sftdist,trl_packed
  step dist_tiny 300 "$PY" tests/bench/bench_distributed_gpu.py --device cpu --shapes tiny \
    --strategies none,fsdp2,zero3 --nproc 1 --steps 3 --demo-size 200 --run-timeout 120
else
  step vs_trl 120 "$PY" tests/bench/bench_vs_trl.py --device cuda --model llama1b --steps 4 --warmup 2 \
    --records 512 --tokenizer .bench_data/smollm2-tokenizer --data .bench_data/gsm8k_train_alpaca.json
  for shape in 1b 8b-4layers; do
    step "dist_$shape" 75 "$PY" tests/bench/bench_distributed_gpu.py --shapes "$shape" \
      --strategies none,fsdp2,zero3 --nproc 1 --steps 5 --demo-size 4000 --run-timeout 35
  done
fi
echo "=== done in $((SECONDS - START)) s; JSON lines in $JSONL" | tee -a "$LOG"
if [[ $DRY == 1 ]]; then
  rm -rf "$SITE"
  [[ $KEEP_BUILD == 1 ]] || rm -rf build
fi
exit 0
