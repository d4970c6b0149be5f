"""Peak memory and time of the loss layer (output head + cross-entropy, forward and backward): the naive path
(sftdist.training.loss.cross_entropy_sum of the full logits, train.loss_impl=naive) against the chunked one on the
supervised positions only (sftdist.kernels.linear_cross_entropy, train.loss_impl=chunked).

    .venv/bin/python tests/bench/bench_loss_layer.py                  # the CPU case: 4096 tokens x 32k vocab x 1024
    .venv/bin/python tests/bench/bench_loss_layer.py --device cuda    # + 16k tokens x 128k vocab x 4096, bf16

Each variant runs in a fresh process. Peak memory is what the layer adds to its inputs (hidden states, head weight):
on CPU the process's peak resident memory (VmHWM, reset before the layer runs) less its resident memory before, on
a GPU torch.cuda.max_memory_allocated less the memory allocated before. Time: the median of 3 runs after a warm-up.
``--supervised`` is the fraction of positions with a target (SFT: the assistant's tokens; 0.5 by default). One JSON
line per case and variant, then one with the ratios.

On CUDA, the third-party fused kernels are measured too where they are installed (``pip install liger-kernel
cut-cross-entropy``; tests/bench/gpu_wheels.sh fetches their wheels for the GPU machine), on the same supervised
positions as ours: Liger-Kernel's ``liger_fused_linear_cross_entropy`` and Apple's cut-cross-entropy
``linear_cross_entropy`` (bf16 only). A variant that is not installed is reported as skipped.

On CUDA two more variants of ours measure the choices the chunked loss makes there: ``chunked_cast_add`` sums the
weight gradient over chunks through a bf16 product and a cast (what it does where torch's ``addmm`` cannot add into
fp32), ``chunked_cpu_chunks`` takes the CPU's smaller chunks. Each chunked line says its ``chunks`` and whether the
sum was ``fused``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "cpu": {"tokens": 4096, "vocab": 32768, "hidden": 1024, "dtype": "fp32"},
    "cuda": {"tokens": 16384, "vocab": 128256, "hidden": 4096, "dtype": "bf16"},
}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _third_party() -> dict:
    """Fused linear + cross-entropy kernels of other projects that import here, with our signature."""
    out = {}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger(h, w, t, dtype):
            loss = liger_fused_linear_cross_entropy(h.to(dtype), w.to(dtype), t, reduction="sum")
            return loss[0] if isinstance(loss, tuple) else loss

        out["liger"] = liger
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cce"] = lambda h, w, t, dtype: cce(h.to(dtype), w.to(dtype), t, reduction="sum")
    except ImportError:
        pass
    return out


def run_one(variant: str, device: str, tokens: int, vocab: int, hidden: int, dtype: str, supervised: float) -> dict:
    import torch

    from sftdist.kernels import linear_cross_entropy as lce
    from sftdist.training.loss import cross_entropy_sum

    torch.manual_seed(0)
    compute = torch.bfloat16 if dtype == "bf16" else torch.float32
    hidden_states = torch.randn(1, tokens, hidden, device=device, requires_grad=True)
    weight = (torch.randn(vocab, hidden, device=device) / hidden**0.5).requires_grad_()
    targets = torch.randint(0, vocab, (1, tokens), device=device)
    targets[torch.rand(1, tokens, device=device) >= supervised] = -100
    index = (targets.flatten() != -100).nonzero()[:, 0]

    def layer() -> float:
        with torch.autocast(device, dtype=compute, enabled=compute != torch.float32):
            if variant == "naive":
                loss = cross_entropy_sum(torch.nn.functional.linear(hidden_states, weight), targets)
            else:
                with torch.autocast(device, enabled=False):
                    h = hidden_states.flatten(0, 1).index_select(0, index)
                    loss = third_party[variant](h, weight, targets.flatten()[index], compute)
        loss.backward()
        hidden_states.grad = weight.grad = None
        return float(loss.detach())

    supervised_tokens = index.numel()
    chunk = lce.chunk_size(supervised_tokens, vocab, hidden, "cpu" if variant == "chunked_cpu_chunks" else device)
    if variant == "chunked_cast_add":
        lce._FUSED_ACCUMULATE[device] = False
    ours = lambda h, w, t, dtype: lce.linear_cross_entropy(h, w, t, dtype, chunk=chunk)  # noqa: E731
    third_party = {v: ours for v in ("chunked", "chunked_cast_add", "chunked_cpu_chunks")} | _third_party()
    if variant != "naive" and variant not in third_party:
        return {"skipped": f"{variant} is not installed"}
    what = {}
    if variant.startswith("chunked"):
        fused = compute != torch.float32 and lce.fused_accumulate(torch.device(device))
        what = {"chunks": -(-supervised_tokens // chunk), "fused": fused}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    loss = layer()  # warm-up (and the allocator's first growth)
    times = []
    for _ in range(3):
        sync()
        start = time.perf_counter()
        layer()
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        layer()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status("VmRSS")
        layer()
        peak = _status("VmHWM") - before
    return {"loss": loss, "seconds": statistics.median(times), "peak_bytes": peak, **what}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--supervised", type=float, default=0.5)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one variant, in its own process
    args = parser.parse_args()
    if args.one:
        variant, device, case = args.one.split(":")
        print(json.dumps(run_one(variant, device, **CASES[case], supervised=args.supervised)))
        return
    cases = ["cpu"] if args.device == "cpu" else ["cuda", "cpu"]  # (on a GPU, the case that matters first)
    for case in cases:
        results = {}
        variants = ["naive", "chunked"]
        if args.device == "cuda":
            variants += (["chunked_cast_add", "chunked_cpu_chunks"] if case == "cuda" else []) + ["liger", "cce"]
        for variant in variants:
            # Each variant in its own process: one that fails (a peer library's error of any kind, out of memory)
            # is a line that says so, and the others still run
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    f"{variant}:{args.device}:{case}",
                    "--supervised",
                    str(args.supervised),
                ],
                capture_output=True,
                text=True,
            )
            lines = proc.stdout.strip().splitlines()
            if proc.returncode or not lines:
                results[variant] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
            else:
                results[variant] = json.loads(lines[-1])
            line = {"bench": "loss_layer", "case": case, "device": args.device, "variant": variant, **CASES[case]}
            print(json.dumps({**line, "supervised": args.supervised, **results[variant]}), flush=True)
        naive, chunked = results["naive"], results["chunked"]
        if "error" in naive or "error" in chunked:
            continue
        others = {v: r for v, r in results.items() if v in ("liger", "cce") and "seconds" in r}
        print(
            json.dumps(
                {
                    "bench": "loss_layer",
                    "case": case,
                    "device": args.device,
                    "memory_ratio": chunked["peak_bytes"] / naive["peak_bytes"],
                    "speedup": naive["seconds"] / chunked["seconds"],
                    "loss_rel_diff": abs(chunked["loss"] - naive["loss"]) / abs(naive["loss"]),
                    **{f"{v}_memory_ratio": r["peak_bytes"] / naive["peak_bytes"] for v, r in others.items()},
                    **{f"{v}_speedup": naive["seconds"] / r["seconds"] for v, r in others.items()},
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
