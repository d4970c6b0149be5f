"""Checkpoints in ``torch.distributed.checkpoint`` (DCP) format, for strategy none, ddp and fsdp2.

``get_state_dict`` names every tensor by its fully qualified name in the unwrapped model (no ``module.``, no FSDP
prefixes), sharded as the strategy holds it; ``dcp.save`` writes each rank's shards (replicated tensors once), and
``dcp.load`` reads whatever slices the loading ranks need. So one format serves all three strategies, and a
checkpoint written on N processes loads on M, each rank reading only its own part. With no process group (one
process) DCP reads and writes without collectives.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

FORMAT = "dcp"


def _single() -> bool:
    """No process group: one process reads and writes everything, without collectives."""
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process, which is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _frozen(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """With a frozen base (LoRA), the parameters that train, by name (DTensors under fsdp2), sharing their storage: a
    frozen base is the model's own, read again at start. (Not ``get_state_dict(ignore_frozen_params=True)``: it walks
    every key of ``model.state_dict()``, which for a 4-bit base holds quantization state that no attribute names, and
    keeps a frozen weight tied to another, lm_head to the embedding.)"""
    return {
        name.removeprefix("module."): param.detach()  # (DDP's wrapper prefix)
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    if _frozen(model):
        model_state, optim_state = _adapter_state(model), get_optimizer_state_dict(model, optimizer)
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
    with _quiet():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory), no_dist=_single())


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    # get_*state_dict give an optimizer without state some (zero-lr) state to load into.
    if _frozen(model):  # the adapters load in place (their tensors share the parameters' storage)
        state = {"model": _adapter_state(model), "optim": get_optimizer_state_dict(model, optimizer)}
        with _quiet():
            dcp.load(state, checkpoint_id=str(directory), no_dist=_single())
        set_optimizer_state_dict(model, optimizer, state["optim"])
        return
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _quiet():
        dcp.load(state, checkpoint_id=str(directory), no_dist=_single())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_model_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a DCP checkpoint, whole, on CPU, by its name in the model (no process group needed)."""
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    with _quiet():
        dcp.load(state, checkpoint_id=str(directory), no_dist=_single())
    return {key[len("model.") :]: tensor for key, tensor in state.items()}
