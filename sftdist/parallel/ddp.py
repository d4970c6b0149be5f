"""``strategy=ddp``: a full replica per process; gradients all-reduced (averaged) once per optimizer step,
in the backward of the step's last micro-batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from sftdist.config import StrategyConfig
from sftdist.parallel.base import local_state_dict
from sftdist.parallel.dist import DistributedStrategy


class DDPStrategy(DistributedStrategy):
    def __init__(self, cfg: StrategyConfig, device: str):
        super().__init__("ddp", device, cfg.timeout_minutes, cfg.context_parallel)
        self._ddp: DistributedDataParallel | None = None

    def setup(
        self,
        model: torch.nn.Module,
        make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
        weights: Callable[[list[str]], Any] | None = None,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = model.to(self.device)
        self._ddp = DistributedDataParallel(  # broadcasts rank 0's weights to every rank
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )
        return self._ddp, make_optimizer(model)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if last else self._ddp.no_sync():
            yield

    def full_state_dict(self, model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        return local_state_dict(self.unwrap(model), trainable_only) if self.is_main else {}
