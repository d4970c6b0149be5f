"""Strategies behind one interface (sftdist.parallel.base.Strategy); the only package that may import
torch.distributed or deepspeed (deepspeed in parallel/deepspeed.py alone)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sftdist.config import SFTConfig
from sftdist.errors import ConfigError
from sftdist.parallel.base import Strategy


def resolve_device(device: str) -> torch.device:
    """``device=auto|cpu|cuda`` -> a torch device, with a clear error for cuda without CUDA."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but this torch build sees no CUDA device; use device=cpu or device=auto")
    return torch.device(device)


def check_world_size(cfg: SFTConfig, world_size: int) -> None:
    """What the number of processes must allow: ConfigError naming the key otherwise."""
    if cfg.strategy.name == "none" and world_size > 1:  # N copies of one run writing one output_dir: never meant
        raise ConfigError(
            f"strategy=none trains in one process, but this was launched with WORLD_SIZE="
            f"{world_size} (torchrun/srun); launch one process or pick a distributed strategy "
            "(strategy=ddp|fsdp2|zero3)"
        )
    cp = cfg.strategy.context_parallel
    if world_size % cp:
        raise ConfigError(
            f"strategy.context_parallel={cp} does not divide the {world_size} processes (world size): each "
            "context-parallel group is that many ranks"
        )
    if cfg.train.global_batch_size % world_size:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by the "
            f"{world_size} processes (world size): make it a multiple of {world_size}"
        )


def build_strategy(cfg: SFTConfig) -> Strategy:
    """The strategy ``cfg.strategy.name`` names; distributed ones join (or start) the process group."""
    name = cfg.strategy.name
    if name == "none":
        from sftdist.parallel.single import SingleProcess

        check_world_size(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        return SingleProcess(resolve_device(cfg.device))
    if name == "ddp":
        from sftdist.parallel.ddp import DDPStrategy

        return DDPStrategy(cfg.strategy, cfg.device)
    if name == "fsdp2":
        from sftdist.parallel.fsdp2 import FSDP2Strategy

        return FSDP2Strategy(cfg.strategy, cfg.device, cfg.precision)
    if name == "zero3":
        from sftdist.parallel.deepspeed import ZeRO3Strategy

        return ZeRO3Strategy(cfg.strategy, cfg.device, cfg.precision, cfg.train.max_grad_norm)
    raise ConfigError(f"strategy.name={name!r}: not one of none, ddp, fsdp2, zero3")


def checkpoint_format(strategy_name: str) -> str:
    """The format of the checkpoints a strategy writes (and the only one it reads)."""
    from sftdist.parallel import dcp, deepspeed  # deepspeed itself is not imported

    return deepspeed.FORMAT if strategy_name == "zero3" else dcp.FORMAT


def full_model_state_dict(directory: Path, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """The whole model of a checkpoint's ``state/`` directory on CPU, in one process (for sftdist-export)."""
    from sftdist.parallel import dcp, deepspeed  # deepspeed itself is imported only to read its format

    readers = {dcp.FORMAT: dcp.full_model_state_dict, deepspeed.FORMAT: deepspeed.full_model_state_dict}
    if checkpoint_format not in readers:
        raise ConfigError(f"{directory}: unknown checkpoint format {checkpoint_format!r}")
    return readers[checkpoint_format](directory)


__all__ = [
    "Strategy",
    "build_strategy",
    "check_world_size",
    "checkpoint_format",
    "full_model_state_dict",
    "resolve_device",
]
