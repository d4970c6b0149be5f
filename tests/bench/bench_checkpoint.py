"""Checkpoint save and load time and size, on CPU, for the demo model and a ~100M-parameter model, on one process
(strategy none) and two (ddp, fsdp2, zero3; torchrun, gloo, one thread each); and the export of a checkpoint.

    .venv/bin/python tests/bench/bench_checkpoint.py [--models demo,100m] [--repeats 3]

Each case trains one step (so that the optimizer has its state), then times ``Checkpointer.save`` (the whole
atomic protocol: every rank's shards, fsync, rename, marker) and ``load_checkpoint`` into the live model and
optimizer, and, on one process, ``sftdist-export`` of the checkpoint into a Hugging Face directory. One JSON line
per case: median seconds over the repeats and the checkpoint's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODELS = {
    "demo": [],  # the tiny Llama of the demo, 3.4M parameters
    "100m": [  # 99.8M parameters
        "model.hidden_size=768",
        "model.num_layers=14",
        "model.num_heads=12",
        "model.num_kv_heads=12",
        "model.intermediate_size=2048",
    ],
}
COMMON = [
    "data.demo_size=200",
    "train.global_batch_size=4",
    "train.max_steps=1",
    "checkpoint.every_steps=0",
    "eval.every_steps=0",
    "wandb.mode=disabled",
    "data.max_length=512",
    "train.micro_batch_tokens=1024",
]


def worker(model: str, strategy: str, out: Path, repeats: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import compose
    from sftdist.run.checkpoint import load_checkpoint
    from sftdist.training import Trainer

    trainer = Trainer(compose(*COMMON, *MODELS[model], f"strategy={strategy}", f"output_dir={out}"))
    trainer.fit()  # one step: the optimizer has state to save
    saves, loads = [], []
    for i in range(repeats):
        start = time.perf_counter()
        path = trainer.checkpointer.save(10 + i, trainer.model, trainer.optimizer)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        load_checkpoint(path, trainer.strategy, trainer.model, trainer.optimizer)
        trainer.strategy.barrier()
        loads.append(time.perf_counter() - start)
    if trainer.strategy.is_main:
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        print(
            json.dumps(
                {
                    "model": model,
                    "parameters_m": round(trainer.runner.num_params / 1e6, 1),
                    "strategy": strategy,
                    "processes": trainer.strategy.world_size,
                    "save_s": round(statistics.median(saves), 3),
                    "load_s": round(statistics.median(loads), 3),
                    "size_mb": round(size / 1e6, 1),
                    "checkpoint": str(path),
                }
            ),
            flush=True,
        )
    trainer.close()


def run(model: str, strategy: str, repeats: int, tmp: Path) -> dict:
    out = tmp / f"{model}-{strategy}"
    args = [__file__, "--worker", model, strategy, str(out), "--repeats", str(repeats)]
    if strategy == "none":
        cmd, env = [sys.executable, *args], dict(os.environ)
    else:
        cmd, env = (
            [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", *args],
            {**os.environ, "OMP_NUM_THREADS": "1"},
        )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="demo,100m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "STRATEGY", "OUT"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], Path(args.worker[2]), args.repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for strategy in ("none", "ddp", "fsdp2", "zero3"):
                row = run(model, strategy, args.repeats, Path(tmp))
                if strategy in ("none", "zero3"):  # the export, on one process, from either format
                    start = time.perf_counter()
                    subprocess.run(
                        [str(BIN / "sftdist-export"), row["checkpoint"], f"{tmp}/export"],
                        check=True,
                        capture_output=True,
                    )
                    row["export_s"] = round(time.perf_counter() - start, 2)
                del row["checkpoint"]
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
