"""Strategies behind one interface (sftdist.parallel.base.Strategy); the only package that may import
torch.distributed or deepspeed."""

from __future__ import annotations

import os

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

        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1:  # N copies of one run writing one output_dir: never what was meant
            raise ValueError(f"strategy=none trains in one process, but this was launched with WORLD_SIZE="
                             f"{world_size} (torchrun/srun); launch one process or pick a distributed strategy")
        return SingleProcess(resolve_device(device))
    raise ValueError(f"strategy.name={cfg.name!r} is not implemented yet in this version")


__all__ = ["Strategy", "build_strategy", "resolve_device"]
