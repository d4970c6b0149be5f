"""CPU step time of sftdist's loop against a plain PyTorch loop on the same tiny model and the same samples.

    .venv/bin/python tests/bench/bench_step.py [--steps 30]

The model is the demo's tiny Llama (3.4M parameters, fp32) and each step 16 demo conversations. The plain
loop is what a user writes by hand: the same padded micro-batches, ``model(input_ids, attention_mask,
labels)`` (transformers' own mean loss, normalised per micro-batch, so its maths is not ours), backward,
AdamW step. sftdist runs through ``Trainer.fit`` (per-step time from metrics.jsonl, the first step left out
as warm-up) with ``strategy=none`` padded and packed, and with ddp / fsdp2 / zero3 on 2 processes
(torchrun, gloo, one thread each) packed. Median seconds per step; the machine's cores are shared by all
processes, so 2 processes on 2 cores are no faster than 1 process with 2 threads.
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
COMMON = [
    "train.global_batch_size=16",
    "train.micro_batch_tokens=2048",
    "data.max_length=1024",
    "eval.every_steps=0",
    "wandb.mode=disabled",
    "train.log_every_steps=1",
]


def plain_loop(steps: int) -> float:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from helpers import compose
    from sftdist.data.batching import StepSampler, plan_padded
    from sftdist.data.dataset import build_datasets
    from sftdist.model import build_model, build_tokenizer, pad_token_id

    cfg = compose(*COMMON)
    tokenizer, template = build_tokenizer(cfg.model, cfg.data)
    train, _, _ = build_datasets(cfg.data, cfg.eval, tokenizer, template, cfg.seed)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    sampler, pad = StepSampler(len(train), 16, cfg.seed), pad_token_id(tokenizer)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        samples = [train[i] for i in sampler.indices(step)]
        groups = plan_padded([len(s.input_ids) for s in samples], cfg.train.micro_batch_tokens)
        for group in groups:
            rows = [samples[i] for i in group]
            width = max(len(s.input_ids) for s in rows)
            ids = torch.tensor([s.input_ids + [pad] * (width - len(s.input_ids)) for s in rows])
            mask = torch.tensor([[1] * len(s.input_ids) + [0] * (width - len(s.input_ids)) for s in rows])
            labels = torch.tensor([s.labels + [-100] * (width - len(s.labels)) for s in rows])
            (model(input_ids=ids, attention_mask=mask, labels=labels).loss / len(groups)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def sftdist_run(steps: int, overrides: list[str], nproc: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        args = [*COMMON, f"train.max_steps={steps + 1}", f"output_dir={tmp}/run", *overrides]
        if nproc == 1:
            cmd = [str(BIN / "sftdist-train"), *args]
        else:
            cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "sftdist.train", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"} if nproc > 1 else dict(os.environ)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        metrics = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
        return statistics.median(m["train/step_s"] for m in metrics[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rows = [("plain PyTorch loop, padded, 1 process", plain_loop(args.steps))]
    for label, overrides, nproc in (
        ("sftdist none, padded, 1 process", ["data.packing=false"], 1),
        ("sftdist none, packed, 1 process", [], 1),
        ("sftdist ddp, packed, 2 processes", ["strategy=ddp"], 2),
        ("sftdist fsdp2, packed, 2 processes", ["strategy=fsdp2"], 2),
        ("sftdist zero3, packed, 2 processes", ["strategy=zero3"], 2),
    ):
        rows.append((label, sftdist_run(args.steps, overrides, nproc)))
    base = rows[0][1]
    print(f"{'setting':<40} {'s/step':>8} {'vs plain':>9}")
    for label, seconds in rows:
        print(f"{label:<40} {seconds:8.4f} {seconds / base:8.2f}x")


if __name__ == "__main__":
    main()
