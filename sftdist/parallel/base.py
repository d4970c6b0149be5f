"""The small interface every strategy implements; the training loop sees nothing else.

A step, whatever the strategy::

    for i, mb in enumerate(this rank's micro-batches):      # the same count on every rank
        with strategy.micro_step(last=i == n - 1):          # DDP: no gradient all-reduce until the last
            loss = CE sum(mb) / supervised tokens of the step * strategy.grad_divisor
            strategy.backward(loss)
    grad_norm = strategy.optimizer_step(optimizer, max_grad_norm)   # clip, step (if finite), zero

``grad_divisor`` is what the strategy's gradient reduction divides by (the data-parallel world size for
DDP, FSDP2 and ZeRO-3, which all average): multiplying it back in makes the reduced gradient the gradient
of the step's token-mean loss, on any number of ranks (sftdist.training.loss does the multiplication).
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sftdist.errors import DataError
from sftdist.parallel import dcp


class Strategy(ABC):
    """How the model is wrapped, how gradients are made and applied, and how weights are gathered."""

    name: str = "none"
    rank: int = 0
    world_size: int = 1
    device: torch.device
    # Context parallelism (sftdist.parallel.context): each packed row split over this many consecutive ranks
    context_parallel: int = 1
    context_group: Any = None

    @property
    def data_rank(self) -> int:
        """Which share of a step's micro-batches this rank trains: every rank of a context-parallel group the same."""
        return self.rank // self.context_parallel

    @property
    def data_size(self) -> int:
        """How many shares a step's micro-batches are dealt into (the world, or its context-parallel groups)."""
        return self.world_size // self.context_parallel

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes shared files (config, metrics, exports)."""
        return self.rank == 0

    @property
    def grad_divisor(self) -> int:
        """What the gradient reduction divides the summed gradients by (1: it sums, or there is none)."""
        return 1

    # Whether the model is built without its weights (``constructing``: parameters on the meta device, or partitioned
    # as they are made) and ``setup`` loads them, each rank only what it keeps; else it is built whole on every rank.
    loads_weights: bool = False

    def constructing(self) -> contextlib.AbstractContextManager:
        """The context the model is built in."""
        return contextlib.nullcontext()

    @abstractmethod
    def setup(
        self,
        model: torch.nn.Module,
        make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
        weights: Callable[[list[str]], Any] | None = None,
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """Place (and shard or replicate) the model, then build its optimizer: (what to call, optimizer). With
        ``loads_weights``, ``weights(names)`` gives the weights to load (sftdist.model.ModelWeights)."""

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The Hugging Face model inside the wrapper (its config, generation config)."""
        return model

    @contextlib.contextmanager
    def micro_step(self, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward; ``last`` is the step's last micro-batch."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of ``loss`` (already normalised by the step's token count)."""
        loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float, loss_finite: bool = True) -> float:
        """Clip to ``max_grad_norm`` (0: no clipping), apply and clear the gradients; the global gradient
        norm before clipping. A step whose norm or loss is not finite is not applied (the optimizer's state and the
        weights stay as they were), its gradients cleared all the same."""
        norm = clip_and_norm([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
        if loss_finite and math.isfinite(norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all ranks, in one collective."""
        return [float(v) for v in values]

    def barrier(self) -> None:
        """Wait for every rank."""

    @contextlib.contextmanager
    def main_first(self, what: str) -> Iterator[None]:
        """Rank 0 runs the block first (preparing ``what``, say the data into its cache); the others run it after,
        or stop at once if rank 0 failed, rather than wait in a barrier that rank 0 never reaches."""
        if not self.is_main:
            (failed,) = self.all_sum([0])
            if failed:
                raise DataError(f"rank 0 stopped while preparing {what} (its error says why); stopping too")
            yield
            return
        try:
            yield
        except BaseException:
            self.all_sum([1])
            raise
        self.all_sum([0])

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a picklable object: a decision only rank 0 can take)."""
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        return [obj]

    # Checkpoints: every rank writes and reads its own part (a collective) of the parameters that train (all of them,
    # or LoRA's adapters: a frozen base is the model's own, loaded at start) and their optimizer state. The format is
    # the strategy's, and a resumed run must use a strategy of the same format; ``reshards``: it loads on another
    # number of processes.
    checkpoint_format: str = dcp.FORMAT
    reshards: bool = True

    def save_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> list[Path]:
        """Write the (trainable) model and optimizer state under ``directory``, sharded as this strategy holds it;
        the files this rank wrote that are not yet flushed to disk (DCP flushes its own: none)."""
        dcp.save(model, optimizer, directory)
        return []

    def load_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        """Load what :meth:`save_state` wrote, on any number of processes for the DCP format (resharded)."""
        dcp.load(model, optimizer, directory)

    @abstractmethod
    def full_state_dict(self, model: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """The full, unsharded weights on CPU, for export (``trainable_only``: the parameters that train, LoRA's
        adapters). Every rank must call it (it may gather); rank 0 gets the weights, the others may get an empty
        dict."""

    def close(self) -> None:
        """Release the process group (when this strategy started it)."""


def local_state_dict(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """A whole (unsharded) model's state dict on CPU; ``trainable_only``: its parameters that require a gradient."""
    if trainable_only:
        return {k: p.detach().cpu() for k, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def clip_and_norm(params: list[torch.nn.Parameter], max_grad_norm: float) -> float:
    """Global gradient norm before clipping, clipping when ``max_grad_norm`` > 0; DTensor gradients
    (FSDP2) give the norm over all shards."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
