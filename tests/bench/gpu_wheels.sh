#!/usr/bin/env bash
# What tests/bench/gpu_suite.sh needs on the GPU machine and its image lacks, gathered HERE (a machine that reaches
# the package registry) into two ignored folders that travel with the call (see gpu_suite.sh's header):
#
#   .whl/          wheels for CPython 3.12 on x86-64: hydra-core, omegaconf, antlr4-python3-runtime (sftdist's config),
#                  peft (model.lora.*),
#                  datasets, dill, multiprocess (sftdist's prepared data), trl (bench_vs_trl.py), deepspeed, hjson,
#                  pydantic and its parts (strategy=zero3), jsonschema and its parts (probe checks), liger-kernel and
#                  cut-cross-entropy (the fused losses bench_loss_layer.py compares with ours on CUDA; Triton is in the
#                  image), wandb and its parts (imported by no GPU run, which all set wandb.mode=disabled; SKIP_WANDB=1
#                  leaves its ~21 MiB out), setuptools (what builds sftdist there: its project.license is an SPDX
#                  string, which a setuptools older than 77 refuses). Everything else sftdist and TRL import is in
#                  the image (its package list: the device notes).
#   .bench_data/   the GSM8K records (../shared/data, which does not travel) and the SmolLM2 tokenizer (from the
#                  directory bench_probes_smollm2.py converts), for bench_vs_trl.py --model llama1b.
#
#     bash tests/bench/gpu_wheels.sh        # ~37 MiB in all (Dec 2026); prints the sizes
#
# Not carried, and why:
# - flash-attn: PyPI has its sdist only (pip download --only-binary=:all: finds no version); that sdist compiles CUDA
#   kernels against the installed torch for an hour or more, or fetches a prebuilt wheel from GitHub, which the GPU
#   machine cannot reach (whether GitHub has one for its torch 2.11 + CUDA 13 was not checked; such wheels are
#   hundreds of MB, over the 64 MiB a call carries). Without it sftdist trains with torch's varlen attention and TRL
#   with sdpa.
# - bitsandbytes (QLoRA): its manylinux wheel carries CUDA kernels for many CUDA versions, ~60-80 MB, over what a call
#   carries beside the rest; tests/gpu/test_lora_gpu.py's QLoRA test skips where it does not import.
# - deepspeed and antlr4-python3-runtime 4.9.3 are sdists only on PyPI too: both are built here into pure-Python
#   wheels (deepspeed with the .venv's torch and no prebuilt ops; sftdist's zero3 uses torch's AdamW, so no op is
#   compiled on the GPU machine either).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PLATFORMS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# The versions are requirements.lock's (the ones the suite passed with), but for the two fused losses, which are no
# dependency of sftdist's and so not in the lock.
LOCKED=(
  hydra-core omegaconf datasets dill multiprocess trl
  hjson pydantic pydantic-core annotated-types typing-inspection
  jsonschema jsonschema-specifications referencing rpds-py
  peft
  setuptools
)
WANDB=(
  wandb cwevals distro sniffio platformdirs googleapis-common-protos
  opentelemetry-api opentelemetry-sdk opentelemetry-proto
  opentelemetry-semantic-conventions opentelemetry-exporter-otlp-proto-http
  opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-http-transport
  opentelemetry-exporter-otlp-common
)
BUILT=(antlr4-python3-runtime deepspeed) # sdists only: built here

# locked NAME...: NAME==VERSION as requirements.lock pins it, or the script stops naming what the lock lacks.
locked() {
  local name pin
  for name; do
    pin=$(grep -m1 -i "^${name}==" requirements.lock) ||
      { echo "gpu_wheels.sh: $name is not in requirements.lock" >&2; return 1; }
    echo "$pin"
  done
}
[[ ${SKIP_WANDB:-0} == 1 ]] || LOCKED+=("${WANDB[@]}")
pins=$(locked "${LOCKED[@]}")
mapfile -t WHEELS <<<"$pins"
WHEELS+=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
pins=$(locked "${BUILT[@]}")
mapfile -t BUILT <<<"$pins"

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
grep -qx '/.bench_data/' .git/info/exclude 2>/dev/null || echo /.bench_data/ >>.git/info/exclude
rm -rf .whl .bench_data
mkdir -p .whl .bench_data

"$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "${BUILT[@]}"
if "$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d .whl flash-attn 2>/dev/null; then
  echo "note: a flash-attn wheel was found and is carried"
else
  echo "note: no flash-attn wheel on the registry for CPython 3.12 / manylinux: not carried"
fi

# The benchmark's data and tokenizer (nothing outside the repository travels).
cp ../shared/data/gsm8k_train_alpaca.json .bench_data/
"$PY" - <<'EOF'
import shutil, sys
sys.path.insert(0, "tests/bench")
from bench_probes_smollm2 import smollm2_directory

source, target = smollm2_directory(), ".bench_data/smollm2-tokenizer"
shutil.os.makedirs(target, exist_ok=True)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    shutil.copy(source / name, target)
EOF

ls -1 .whl
du -sh .whl .bench_data
du -sch .whl .bench_data | tail -1
