"""The small interface every strategy implements; the training loop sees nothing else."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Strategy(ABC):
    """How the model is wrapped, how gradients are made and applied, and how weights are gathered."""

    rank: int = 0
    world_size: int = 1
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes shared files (config, metrics, exports)."""
        return self.rank == 0

    @abstractmethod
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Place (and, for distributed strategies, shard or replicate) the model; returns what to call."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` (already normalised by the step's token count)."""

    @abstractmethod
    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        """Global gradient norm before clipping; clips to ``max_norm`` unless it is 0."""

    @abstractmethod
    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply and then clear the accumulated gradients."""

    @abstractmethod
    def sum_across_ranks(self, value: float) -> float:
        """Sum of ``value`` over all ranks (the global supervised-token count, for one)."""

    @abstractmethod
    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full, unsharded weights on CPU, for export (on rank 0; other ranks may get an empty dict)."""
