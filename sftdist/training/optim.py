"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from sftdist.config import TrainConfig


def epoch_steps(cfg: TrainConfig, num_samples: int) -> int:
    """The optimizer steps of ``train.epochs`` passes over ``num_samples`` training samples."""
    return max(1, math.ceil(Fraction(str(cfg.epochs)) * num_samples / cfg.global_batch_size))  # (1.1 * 1600 / 16: 110)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based step ``step``: linear warm-up, then cosine down to lr * min_lr_ratio."""
    warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)  # the peak comes once, right after warm-up
    min_lr = cfg.lr * cfg.min_lr_ratio
    progress = (step - warmup) / max(1, cfg.max_steps - 1 - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - min_lr)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
