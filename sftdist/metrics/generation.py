"""Greedy generation for the probes, on any number of ranks without a hang.

The prompts are cut into batches of ``batch_size`` in order, and the batches are dealt whole to the ranks in
rounds (batch k to rank k mod world), so a batch holds the same prompts on any number of ranks and its answers do
not depend on the topology. Under fsdp2 and zero3 every forward is a collective (the layers' weights are gathered),
so every rank runs every round, a dummy batch where it has none, and every generation runs until the last rank's
prompts are all done (transformers' ``synced_gpus``: a rank that is done keeps stepping, one all-reduce per token
deciding when all are): ranks whose answers end at very different lengths wait for each other, never hang.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from sftdist.model.attention import standard_attention


@dataclass
class Generated:
    tokens: list[int]  # the answer, the stop token not included
    stopped: bool  # ended with a stop token before max_new_tokens


def generate_greedy(
    model: torch.nn.Module,
    strategy,
    prompts: Sequence[list[int]],
    *,
    stop_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager],
) -> list[Generated]:
    """Greedy answers to ``prompts`` (token ids), on every rank, in prompt order (a collective: every rank calls it
    with the same prompts)."""
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    world, rank = strategy.world_size, strategy.rank
    mine: dict[int, Generated] = {}
    model.eval()
    with standard_attention(model):
        for round_ in range(math.ceil(len(batches) / world)):
            k = round_ * world + rank
            rows = batches[k] if k < len(batches) else batches[0][:1]  # a dummy keeps this rank in the collectives
            with autocast():
                out = _generate(model, [prompts[i] for i in rows], stop_ids, pad_id, max_new_tokens, device, world > 1)
            if k < len(batches):
                mine.update(zip(rows, out))
    merged: dict[int, Generated] = {}
    for part in strategy.all_gather_object(mine):
        merged.update(part)
    return [merged[i] for i in range(len(prompts))]


@torch.no_grad()
def _generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    stop_ids: list[int],
    pad_id: int,
    max_new_tokens: int,
    device: torch.device,
    synced: bool,
) -> list[Generated]:
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)  # padded on the left
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(stop_ids) or None,
        pad_token_id=pad_id,
        use_cache=True,
    )
    # Plain greedy decoding: the model's own generation settings (a repetition penalty, no-repeat n-grams, a minimum
    # length, which transformers would merge into any setting left unset) must not hide what the probes measure.
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        sequences = model.generate(
            input_ids=input_ids, attention_mask=mask, generation_config=config, synced_gpus=synced
        )
    finally:
        model.generation_config = saved
    out = []
    for row in sequences[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stop_ids), None)
        out.append(Generated(row if end is None else row[:end], end is not None))
    return out
