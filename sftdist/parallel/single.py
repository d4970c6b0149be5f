"""``strategy=none``: one process, no process group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sftdist.parallel.base import Strategy, local_state_dict


class SingleProcess(Strategy):
    name = "none"

    def __init__(self, device: torch.device):
        self.device = device

    def setup(
        self,
        model: torch.nn.Module,
        make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
        weights: Callable[[list[str]], Any] | None = None,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = model.to(self.device)
        return model, make_optimizer(model)

    def full_state_dict(self, model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        return local_state_dict(model, trainable_only)
