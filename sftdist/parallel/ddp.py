"""``strategy=ddp``: a full replica per process; gradients all-reduced (averaged) once per optimizer step,
in the backward of the step's last micro-batch."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from sftdist.config import StrategyConfig
from sftdist.parallel.base import Strategy, clip_and_norm
from sftdist.parallel.dist import all_sum, init_process_group


class DDPStrategy(Strategy):
    name = "ddp"

    def __init__(self, cfg: StrategyConfig, device: str):
        self.rank, self.world_size, self.device, self._owns_group = init_process_group(
            "ddp", device, cfg.timeout_minutes)
        self._ddp: DistributedDataParallel | None = None

    @property
    def grad_divisor(self) -> int:
        return self.world_size  # DDP averages

    def setup(self, model: torch.nn.Module, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer]
              ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = model.to(self.device)
        self._ddp = DistributedDataParallel(  # broadcasts rank 0's weights to every rank
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return self._ddp, make_optimizer(model)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if last else self._ddp.no_sync():
            yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> float:
        norm = clip_and_norm([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def all_sum(self, values: list[float]) -> list[float]:
        return all_sum(values, self.device)

    def barrier(self) -> None:
        dist.barrier()

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        if not self.is_main:
            return {}
        return {k: v.detach().cpu() for k, v in self.unwrap(model).state_dict().items()}

    def full_grads(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().cpu().clone() for n, p in self.unwrap(model).named_parameters()
                if p.grad is not None}

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
