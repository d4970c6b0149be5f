"""GPU throughput of a ~1B Llama-shaped model with fsdp2 and zero3: tokens/s, MFU and peak memory.

    .venv/bin/python tests/bench/bench_distributed_gpu.py [--steps 12] [--strategies fsdp2,zero3]

One process per visible GPU (torchrun --standalone), bf16, packed 4096-token micro-batches, flash-attn when
installed (else torch varlen), the demo conversations (20k of them) as data. The model is the demo's Llama
shape scaled up: hidden 2048, 22 layers, 32 heads (4 KV heads), MLP 5632, about 0.97B parameters without
embeddings (TinyLlama-1.1B's shape; the vocabulary is the demo tokenizer's). Reported: medians over the
steps after the first two (warm-up) of train/tokens_per_s, train/mfu and train/peak_mem_gib.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
MODEL = [
    "model.hidden_size=2048",
    "model.num_layers=22",
    "model.num_heads=32",
    "model.num_kv_heads=4",
    "model.intermediate_size=5632",
    "model.max_position_embeddings=4096",
]
RUN = [
    "precision=bf16",
    "train.micro_batch_tokens=4096",
    "data.max_length=4096",
    "data.demo_size=20000",
    "eval.every_steps=0",
    "wandb.mode=disabled",
    "train.lr=3e-4",
]


def run(strategy: str, steps: int, gpus: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            str(BIN / "torchrun"),
            "--standalone",
            f"--nproc_per_node={gpus}",
            "-m",
            "sftdist.train",
            *MODEL,
            *RUN,
            f"strategy={strategy}",
            f"train.max_steps={steps}",
            f"train.global_batch_size={256 * gpus}",
            f"output_dir={tmp}/run",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=dict(os.environ))
        if proc.returncode:
            return {"error": proc.stderr[-2000:]}
        metrics = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()][2:]
        return {
            key: statistics.median(m[key] for m in metrics)
            for key in ("train/tokens_per_s", "train/mfu", "train/peak_mem_gib", "train/packing_efficiency")
        }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--strategies", default="fsdp2,zero3")
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    if not gpus:
        raise SystemExit("needs a CUDA device")
    print(f"{torch.cuda.get_device_name(0)} x {gpus}")
    for strategy in args.strategies.split(","):
        print(strategy, json.dumps(run(strategy, args.steps, gpus)))


if __name__ == "__main__":
    main()
