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
# Steps, in the order of what matters, each with its own timeout (a failure or a timeout is logged, and the next step
# runs; every JSON line a step printed is kept whatever comes after), limits adding up to BUDGET (480 s):
#   install    the wheels and sftdist into /tmp/site; one line of versions (torch, CUDA, transformers, triton,
#              deepspeed, flash-attn, trl)                                            <= 60 s
#   vs_trl     sftdist's tokens/s and MFU on a ~1B Llama with a 128k-token head (Llama-3's vocabulary), bf16,
#              packed 4096, on GSM8K rows, against TRL padded and packed (documents isolated or not, measured) in
#              the same run; each line says the attention backend and loss that ran       <= 150 s
#   loss       bench_loss_layer.py --device cuda: the 16k x 128k case first, ours as it runs, then with
#              the CPU's chunks and the bf16 cast-and-add sum, then Liger-Kernel and CCE  <= 70 s
#   tests      pytest tests/gpu -v: each test by name                                  <= 90 s
#   dist       bench_distributed_gpu.py, fsdp2 and zero3 on 1 GPU, on the model vs_trl built and kept (its
#              128k head) and the same GSM8K rows (the demo's 1b shape and data if vs_trl did not get that far),
#              each run stopped once its steps are measured (no export of the 1B model)  <= 110 s
# and no step starts past BUDGET from the start. zero3 is reported as skipped where deepspeed does not import; a run
# of bench_distributed_gpu.py that outlasts its --run-timeout is reported as such, its processes killed.
#
# Checking the plumbing without a GPU: every step in a tiny CPU configuration with the .venv (the wheels are not
# installed, sftdist is, into a temporary --target; the GPU tests skip; bench_loss_layer.py only parses --help, its
# CPU case alone taking minutes; vs_trl on the demo tokenizer and 16 demo conversations), under a minute on 2 cores
# (tests/e2e/test_gpu_suite.py runs it):
#
#     SFTDIST_GPU_SUITE_DRY=1 OUT=/tmp/gpu_suite_dry bash tests/bench/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=${SFTDIST_GPU_SUITE_DRY:-0}
OUT=${OUT:-./gpu_suite_out}
BUDGET=${BUDGET:-480}
# Each step's limit in seconds, in the order the steps run: they add up to BUDGET at most (a test checks it)
STEPS=(install:60 vs_trl:150 loss:70 tests:90 dist:110)
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

# step NAME CMD...: CMD under timeout (its limit in STEPS, at most what is left of the budget), its output into the
# log and its JSON lines into the JSONL, then the step's own line: exit status, seconds, last line of output.
step() {
  local name=$1 limit=0 begin=$SECONDS rc=-1 entry
  shift
  for entry in "${STEPS[@]}"; do [[ ${entry%%:*} == "$name" ]] && limit=${entry#*:}; done
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
  PYTHONPATH=$SITE PYTHONSAFEPATH=1 "$PY" - <<'PYEOF'
import importlib.metadata, json, sftdist.conf, sftdist.kernels, sftdist.training, torch

def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None

row = {"bench": "gpu_suite", "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available(), "sftdist_from": sftdist.__file__,
       **{name: version(name) for name in ("transformers", "triton", "deepspeed", "flash-attn", "trl", "datasets")}}}
print(json.dumps(row))
PYEOF
}
export -f install_packages

step install bash -c install_packages
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
[[ $DRY == 1 ]] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

# PYTHONSAFEPATH: the repository root not on sys.path, so that the tests and benchmarks import the installed sftdist
# (with its kernels/ and conf/), not the source folder.
if [[ $DRY == 1 ]]; then # (the demo tokenizer and 16 demo conversations as alpaca records: no ../shared, no hub)
  "$PY" - "$OUT/dry_data.json" <<'PYEOF'
import json, sys
from sftdist.data.demo import generate_demo_conversations

records = []
for r in generate_demo_conversations(16, seed=0):
    user = next(m["content"] for m in r["messages"] if m["role"] == "user")
    answer = next(m["content"] for m in r["messages"] if m["role"] == "assistant")
    records.append({"instruction": user, "input": "", "output": answer})
json.dump(records, open(sys.argv[1], "w"))
PYEOF
  DATA=$OUT/dry_data.json
  step vs_trl "$PY" tests/bench/bench_vs_trl.py --device cpu --model tiny --tokenizer demo --steps 1 --warmup 1 \
    --records 16 --data "$DATA" --runs sftdist,trl_packed --keep-model "$OUT/model"
else
  DATA=.bench_data/gsm8k_train_alpaca.json
  step vs_trl "$PY" tests/bench/bench_vs_trl.py --device cuda --model llama1b --vocab 128256 --steps 4 \
    --warmup 2 --records 512 --tokenizer .bench_data/smollm2-tokenizer --data "$DATA" \
    --runs sftdist,trl_padded,trl_packed --keep-model "$OUT/model"
fi

if [[ $DRY == 1 ]]; then # (its CPU case alone takes minutes on 2 cores)
  step loss "$PY" tests/bench/bench_loss_layer.py --help
else
  step loss "$PY" tests/bench/bench_loss_layer.py --device cuda
fi

step tests env PYTHONSAFEPATH=1 "$PY" -m pytest tests/gpu -v -p no:cacheprovider

# The model vs_trl built and kept, on the same records; the demo shape and data where it did not get that far
[[ -f $OUT/model/config.json ]] && MODEL=(--model-dir "$OUT/model" --data "$DATA") || MODEL=()
if [[ $DRY == 1 ]]; then
  step dist "$PY" tests/bench/bench_distributed_gpu.py --device cpu --shapes tiny --strategies fsdp2 \
    --nproc 1 --steps 3 --demo-size 200 --run-timeout 100 "${MODEL[@]}"
else
  step dist "$PY" tests/bench/bench_distributed_gpu.py --shapes 1b --strategies fsdp2,zero3 --nproc 1 \
    --steps 5 --demo-size 4000 --run-timeout 50 "${MODEL[@]}"
fi
rm -rf "$OUT/model" # (gigabytes: not to come back with $OUT)
echo "=== done in $((SECONDS - START)) s; JSON lines in $JSONL" | tee -a "$LOG"
if [[ $DRY == 1 ]]; then
  rm -rf "$SITE"
  [[ $KEEP_BUILD == 1 ]] || rm -rf build
fi
exit 0
