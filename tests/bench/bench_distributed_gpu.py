"""GPU throughput of Llama-shaped models per strategy (none, fsdp2, zero3): tokens/s, MFU and peak memory.

    python tests/bench/bench_distributed_gpu.py [--shapes 1b,8b-4layers] [--strategies none,fsdp2,zero3]
        [--nproc N] [--steps 12] [--model-dir DIR] [--data FILE]

One torchrun per shape and strategy, ``--nproc`` processes (default: one per visible GPU; ``none`` always runs
one), bf16, packed 4096-token micro-batches, the attention sftdist picks (flash-attn when installed, else torch
varlen), 256 samples per step per process. Data: the records of ``--data`` (alpaca format, e.g. GSM8K) or else the
demo conversations (``--demo-size`` of them). Model: ``--model-dir``, a Hugging Face model directory (gpu_suite.sh
passes the ~1B Llama with a 128k-token head that bench_vs_trl.py built and kept: a real SFT head and real rows,
where the shapes below have the demo tokenizer's 503 tokens), or else one of the shapes:

- ``1b``: the demo's Llama shape scaled up to TinyLlama-1.1B's: hidden 2048, 22 layers, 32 heads (4 KV heads),
  MLP 5632, about 0.97B parameters without embeddings (the vocabulary is the demo tokenizer's);
- ``8b-4layers``: Llama-3-8B's layer (hidden 4096, 32 heads, 8 KV heads, MLP 14336) with 4 layers instead of 32,
  about 0.87B parameters without embeddings: the per-layer costs of an 8B model on one GPU;
- ``tiny``: 2 layers of hidden 64, with ``--device cpu`` (fp32, gloo) only to check the plumbing.

One JSON line per shape and strategy: medians over the steps after the first two (warm-up) of train/tokens_per_s,
train/mfu and train/peak_mem_gib, or the error, or why it was skipped (zero3 without deepspeed installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent
SHAPES = {
    "1b": dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632),
    "8b-4layers": dict(hidden_size=4096, num_layers=4, num_heads=32, num_kv_heads=8, intermediate_size=14336),
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
}
RUN = {  # per device: the run's settings, and samples per step per process
    "cuda": (["precision=bf16", "train.micro_batch_tokens=4096", "data.max_length=4096"], 256),
    "cpu": (["precision=fp32", "train.micro_batch_tokens=1024", "data.max_length=1024"], 8),
}
COMMON = ["eval.every_steps=0", "checkpoint.every_steps=0", "wandb.mode=disabled", "train.lr=3e-4"]
KEYS = ("train/tokens_per_s", "train/mfu", "train/peak_mem_gib", "train/budget_fill", "train/padding_fraction")


def _root_cause(stderr: str) -> str:
    """The failed run's own traceback tail, without the report torchrun's agent adds after it."""
    lines = stderr.splitlines()
    cut = next((i for i, line in enumerate(lines) if re.match(r"E\d{4} ", line)), len(lines))  # E1203 hh:mm:ss ...
    return "\n".join(lines[:cut])[-1500:]


def run(shape: str, strategy: str, nproc: int, args) -> dict:
    settings, samples = RUN[args.device]
    if args.model_dir:
        model = [f"model.name_or_path={args.model_dir.resolve()}"]
    else:
        model = [f"model.{key}={value}" for key, value in SHAPES[shape].items()]
        model.append("model.max_position_embeddings=4096")
    data = [f"data.path={args.data.resolve()}"] if args.data else [f"data.demo_size={args.demo_size}"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            str(BIN / "torchrun"),
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "sftdist.train",
            *model,
            *settings,
            *COMMON,
            f"device={args.device}",
            *data,
            f"strategy={strategy}",
            f"train.max_steps={args.steps}",
            f"train.global_batch_size={samples * nproc}",
            f"output_dir={tmp}/run",
        ]
        logged = Path(f"{tmp}/run/metrics.jsonl")

        def measured() -> bool:  # (the last step logged: a line per step, train.log_every_steps=1)
            return logged.is_file() and logged.read_text().count("\n") >= args.steps

        returncode, stderr = run_group(cmd, tmp, args.run_timeout, measured)
        if returncode is None:
            return {"error": f"timed out after {args.run_timeout} s"}
        if returncode:
            return {"error": _root_cause(stderr)}
        metrics = [json.loads(line) for line in logged.read_text().splitlines()][2 : args.steps]
        result = {"steps_measured": len(metrics), **_chosen(stderr)}
        for key in KEYS:
            if metrics and key in metrics[0]:
                result[key.removeprefix("train/")] = round(statistics.median(m[key] for m in metrics), 4)
        return result


def run_group(
    cmd: list[str], cwd: str, timeout: float | None, done: Callable[[], bool] | None = None
) -> tuple[int | None, str]:
    """(return code, output: the log, then any traceback) of ``cmd`` in a process group of its own. Past
    ``timeout`` the whole group is killed (torchrun and its workers: killing torchrun alone leaves the workers on
    the GPU during the next run) and the code is None; once ``done()`` (the steps measured), it is killed too, with
    code 0: what the run would do after them (export a 1B model's final/, gigabytes) is not measured, so not paid
    for."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=err, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + timeout if timeout else None
        code: int | None = None
        while True:
            if proc.poll() is not None:
                code = proc.returncode
                break
            finished = done is not None and done()
            if finished or (deadline is not None and time.monotonic() > deadline):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = 0 if finished else None
                break
            time.sleep(0.5)
        err.seek(0)
        return code, err.read() if code is not None else ""


def _chosen(stderr: str) -> dict[str, str]:
    """The attention backend and loss implementation the run said it used (its start-up line)."""
    found = re.search(r"attention (.+?), loss (.+)", stderr)
    return {"attention": found.group(1), "loss_impl": found.group(2).strip()} if found else {}


def _described(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    return (
        f"{model_dir.name}: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
        f"vocabulary {config['vocab_size']}"
    )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--strategies", default="fsdp2,zero3", help="comma-separated, of none, ddp, fsdp2, zero3")
    parser.add_argument("--nproc", type=int, help="processes per run (default: one per visible GPU)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run, the first two not measured")
    parser.add_argument("--demo-size", type=int, default=20000, help="demo conversations generated as data")
    parser.add_argument("--data", type=Path, help="alpaca-format records as data instead of demo conversations")
    parser.add_argument("--model-dir", type=Path, help="a Hugging Face model directory instead of --shapes")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a plumbing check only")
    parser.add_argument("--run-timeout", type=float, help="seconds one run may take before it is reported as such")
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    if args.device == "cuda" and not gpus:
        raise SystemExit("needs a CUDA device")
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    for shape in [_described(args.model_dir)] if args.model_dir else args.shapes.split(","):
        for strategy in args.strategies.split(","):
            nproc = 1 if strategy == "none" else args.nproc or gpus or 1
            row = {"bench": "distributed_gpu", "device": device_name, "shape": shape, "strategy": strategy}
            if strategy == "zero3" and importlib.util.find_spec("deepspeed") is None:
                row["skipped"] = "deepspeed is not installed"
            else:
                row.update(nproc=nproc, **run(shape, strategy, nproc, args))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
