"""The base model's own token-mean loss of every prepared sample (``curriculum.difficulty=model_loss``): computed
once before training, shared out over the ranks (every rank runs the same number of forwards, as the sharded
strategies need), gathered on every rank, and cached beside the prepared data by the data fingerprint and the
model, so that a second run reads it back."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sftdist.config import SFTConfig
from sftdist.data.batching import MicroBatch, assign_to_ranks, collate_packed, empty_micro_batch, plan_packed
from sftdist.data.dataset import Sample
from sftdist.data.prepared import cache_root
from sftdist.data.template import IGNORE_INDEX
from sftdist.model import model_identity

log = logging.getLogger(__name__)
VERSION = 1  # bump when the scores of the same inputs would change


def cache_file(cfg: SFTConfig, fingerprint: str) -> Path:
    identity = model_identity(cfg.model, cfg.seed)
    key = hashlib.sha256(f"model_loss-v{VERSION} {fingerprint} {identity}".encode()).hexdigest()[:24]
    return cache_root(cfg.data).parent / "model_loss" / f"{key}.npy"


def sample_losses(logits: torch.Tensor, mb: MicroBatch, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, supervised tokens) of each sample of a packed micro-batch."""
    targets = mb.targets[0]  # (L,)
    ce = torch.nn.functional.cross_entropy(logits[0].float(), targets, reduction="none", ignore_index=IGNORE_INDEX)
    lengths = (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(num_samples, device=ce.device), lengths.to(ce.device))
    sums = torch.zeros(num_samples, device=ce.device, dtype=torch.float64).index_add_(0, segment, ce.double())
    counts = torch.zeros(num_samples, device=ce.device, dtype=torch.float64).index_add_(
        0, segment, (targets != IGNORE_INDEX).double()
    )
    return sums, counts


@torch.no_grad()
def score_model_loss(
    table: Any,
    logits: Callable[[MicroBatch], torch.Tensor],
    micro_batch_tokens: int,
    pad_id: int,
    strategy: Any,
    device: torch.device,
) -> np.ndarray:
    """The token-mean loss of every table row under the model behind ``logits`` (packed micro-batches)."""
    lengths = table.data.column("length").to_numpy()
    groups = plan_packed(lengths.tolist(), micro_batch_tokens)
    dealt = assign_to_ranks([float(sum(lengths[i] for i in g)) for g in groups], strategy.world_size)
    mine, steps = [groups[g] for g in dealt[strategy.rank]], max(len(d) for d in dealt)
    rows: list[int] = []
    values: list[float] = []
    for k in range(steps):  # the same number of forwards on every rank
        if k < len(mine):
            samples = [Sample(row["input_ids"], row["labels"], {}) for row in (table[int(i)] for i in mine[k])]
            mb = collate_packed(samples, micro_batch_tokens).to(device)
            sums, counts = sample_losses(logits(mb), mb, len(samples))
            rows += [int(i) for i in mine[k]]
            values += (sums / counts.clamp_min(1)).tolist()
        else:
            logits(empty_micro_batch(pad_id, packed=True).to(device))
    scores = np.full(len(lengths), np.nan)
    for part_rows, part_values in strategy.all_gather_object((rows, values)):
        scores[part_rows] = part_values
    return scores


def cached_model_loss(cfg: SFTConfig, fingerprint: str, compute: Callable[[], np.ndarray], is_main: bool) -> np.ndarray:
    """The model_loss scores from the cache, or computed (and cached by rank 0)."""
    path = cache_file(cfg, fingerprint)
    if cfg.data.cache and path.is_file():
        log.info("model_loss: the base model's losses from the cache (%s)", path)
        return np.load(path, allow_pickle=False)
    start = time.perf_counter()
    scores = compute()
    log.info("model_loss: scored %d samples with the base model in %.1f s", len(scores), time.perf_counter() - start)
    if cfg.data.cache and is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npy")
        np.save(tmp, scores, allow_pickle=False)
        tmp.replace(path)
    return scores
