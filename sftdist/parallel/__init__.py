"""Strategies behind one interface (sftdist.parallel.base.Strategy); the only package that may import
torch.distributed or deepspeed."""

from __future__ import annotations

import torch

from sftdist.config import StrategyConfig
from sftdist.parallel.base import Strategy


def resolve_device(device: str) -> torch.device:
    """``device=auto|cpu|cuda`` -> a torch device, with a clear error for cuda without CUDA."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but this torch build sees no CUDA device; use device=cpu or device=auto")
    return torch.device(device)


def build_strategy(cfg: StrategyConfig, device: str) -> Strategy:
    if cfg.name == "none":
        from sftdist.parallel.single import SingleProcess

        return SingleProcess(resolve_device(device))
    raise ValueError(f"strategy.name={cfg.name!r} is not implemented yet in this version")


__all__ = ["Strategy", "build_strategy", "resolve_device"]
