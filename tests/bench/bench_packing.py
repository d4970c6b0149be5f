"""Packing efficiency (real tokens / micro-batch token budgets used) of sftdist's best-fit-decreasing plan,
side by side with TRL's ``pack_dataset(strategy="bfd")`` on the same sample lengths, for the three files of
../shared/data at 2048/4096/8192-token budgets; and, with ``--gpu``, training tokens/s packed vs padded.

    .venv/bin/pip install -c requirements.lock -e '.[bench]'   # trl (not a dependency of sftdist)
    .venv/bin/python tests/bench/bench_packing.py [--gpu]

Lengths come from sftdist's own preparation with the tokenizer of bench_encode.py (8k byte-level BPE,
Qwen2.5 template); samples longer than a budget are cut to it for both packers (TRL's bfd truncates them
too), so both pack the same token counts. "whole file" packs every sample at once (TRL's setting); "bound" is
the best any packer can do (every budget full but the last); "per step" is what training sees: each global
batch of 256 samples (seeded order) packed on its own.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encode import FILES, SHARED, build_tokenizer  # noqa: E402

BUDGETS = (2048, 4096, 8192)


def sample_lengths(tokenizer) -> dict[str, np.ndarray]:
    from sftdist.config import DataConfig
    from sftdist.data.pipeline import prepare

    out = {}
    for name in FILES:
        table, _ = prepare(
            DataConfig(path=str(SHARED / "data" / name), cache=False, max_length=1 << 20, max_rejected_fraction=1.0),
            tokenizer,
            tokenizer.chat_template,
            seed=0,
        )
        out[name] = table.data.column("length").to_numpy()
    return out


def sftdist_efficiency(lengths: np.ndarray, budget: int, step: int | None = None) -> float:
    from sftdist.data.batching import plan_packed

    groups = (
        [lengths]
        if step is None
        else [
            lengths[np.random.default_rng(0).permutation(len(lengths))][i : i + step]
            for i in range(0, len(lengths), step)
        ]
    )
    bins = sum(len(plan_packed(g.tolist(), budget)) for g in groups)
    return float(lengths.sum()) / (bins * budget)


def trl_efficiency(lengths: np.ndarray, budget: int) -> float:
    import datasets
    from trl.data_utils import pack_dataset

    packed = pack_dataset(datasets.Dataset.from_dict({"input_ids": [[1] * int(n) for n in lengths]}), budget, "bfd")
    return float(lengths.sum()) / (len(packed) * budget)


def gpu_throughput(steps: int = 20) -> None:
    """Tokens/s of a ~125M Llama, bf16, packed (attn_impl=auto) vs padded (sdpa + padding mask)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftdist.data.batching import build_micro_batches
    from sftdist.data.dataset import Sample
    from sftdist.model.attention import apply_packed_attention, packed_attention_kwargs, resolve_backend
    from sftdist.training.loss import cross_entropy_sum, step_normalised_loss

    tokenizer = build_tokenizer()
    lengths = sample_lengths(tokenizer)["alpaca_en_demo.json"]
    rng = np.random.default_rng(0)
    samples = [
        Sample(rng.integers(0, 8000, int(n)).tolist(), rng.integers(0, 8000, int(n)).tolist(), {})
        for n in np.minimum(lengths, 4096)
    ]
    device = torch.device("cuda")
    for packing in (True, False):
        config = LlamaConfig(
            vocab_size=8192,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(config).to(device)
        backend = resolve_backend("auto", device) if packing else "sdpa (padded)"
        if packing:
            apply_packed_attention(model, backend)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        tokens, start = 0, None
        for step in range(steps + 3):
            if step == 3:
                torch.cuda.synchronize()
                start, tokens = time.perf_counter(), 0
            batch = [samples[i] for i in rng.integers(0, len(samples), 64)]
            mbs = build_micro_batches(batch, 4096, 0, packing)
            n = sum(mb.num_supervised for mb in mbs)
            for mb in mbs:
                mb = mb.to(device)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    kwargs = (
                        {"position_ids": mb.position_ids, **packed_attention_kwargs(mb.cu_seqlens, mb.max_seqlen)}
                        if mb.packed
                        else {"attention_mask": mb.attention_mask}
                    )
                    logits = model(input_ids=mb.input_ids, use_cache=False, **kwargs).logits
                step_normalised_loss(cross_entropy_sum(logits, mb.targets), n).backward()
                tokens += mb.num_tokens
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        print(
            f"{'packed' if packing else 'padded'} ({backend}): {tokens / (time.perf_counter() - start):,.0f} tokens/s",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="also measure tokens/s packed vs padded on CUDA")
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    lengths = sample_lengths(build_tokenizer())
    print(f"{'file':<30} {'budget':>6} {'sftdist whole file':>19} {'TRL bfd':>8} {'bound':>8} {'sftdist per step':>17}")
    for name, lens in lengths.items():
        for budget in BUDGETS:
            clipped = np.minimum(lens, budget)
            bound = clipped.sum() / (-(-clipped.sum() // budget) * budget)  # every budget full but the last
            print(
                f"{name:<30} {budget:>6} {100 * sftdist_efficiency(clipped, budget):>18.2f}% "
                f"{100 * trl_efficiency(clipped, budget):>7.2f}% {100 * bound:>7.2f}% "
                f"{100 * sftdist_efficiency(clipped, budget, 256):>16.2f}%",
                flush=True,
            )
    if args.gpu:
        gpu_throughput()


if __name__ == "__main__":
    main()
