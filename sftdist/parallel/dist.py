"""The process group: started from the environment torchrun (or launch/torchrun.sh under Slurm) sets."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from sftdist.errors import ConfigError
from sftdist.parallel.base import Strategy

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_process_group(strategy: str, device: str, timeout_minutes: int) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, this rank's device, whether this call started the group). gloo on CPU, nccl on
    CUDA (one GPU per process, by LOCAL_RANK). An existing group (a caller that started its own) is reused."""
    missing = [k for k in _ENV if k not in os.environ]
    if missing and not dist.is_initialized():
        raise ConfigError(
            f"strategy={strategy} needs a process group, but this process was not started by torchrun (no "
            f"{', '.join(missing)} in its environment). Launch it with: torchrun --nproc_per_node=N -m "
            f"sftdist.train strategy={strategy} ... (or launch/torchrun.sh, which the Slurm scripts use); "
            "strategy=none trains in one process"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("device='cuda' but this torch build sees no CUDA device; use device=cpu or device=auto")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPUs: "
                "launch at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        here = torch.device("cuda", local_rank)
    else:
        here = torch.device("cpu")
    started = False
    if not dist.is_initialized():
        # On CUDA, gloo beside NCCL for CPU tensors (FSDP2 with CPU offload reduces norms of CPU shards).
        dist.init_process_group(
            "cpu:gloo,cuda:nccl" if use_cuda else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
            device_id=here if use_cuda else None,
        )
        started = True
    return dist.get_rank(), dist.get_world_size(), here, started


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all ranks in one all-reduce (float64, so token counts stay exact)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class DistributedStrategy(Strategy):
    """What the data-parallel strategies share: the process group, sums and barriers over it, and gradient
    reductions that average over the ranks."""

    def __init__(self, name: str, device: str, timeout_minutes: int, context_parallel: int = 1):
        self.name = name
        self.rank, self.world_size, self.device, self._owns_group = init_process_group(name, device, timeout_minutes)
        if context_parallel > 1:
            from sftdist.parallel.context import context_group

            self.context_parallel, self.context_group = context_parallel, context_group(context_parallel)

    @property
    def grad_divisor(self) -> int:
        return self.world_size  # DDP's all-reduce, FSDP2's reduce-scatter and ZeRO's reduction all average

    def all_sum(self, values: list[float]) -> list[float]:
        return all_sum(values, self.device)

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
