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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

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


# The parameters that train and their optimizer state: a frozen base (LoRA's) is the model's own, loaded at start.
_TRAINABLE = StateDictOptions(ignore_frozen_params=True)


def _trainable(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model and optimizer state dicts of the parameters that train. (``ignore_frozen_params`` goes by parameter
    name, once per tensor: a frozen weight tied to another, lm_head to the embedding, would still be saved.)"""
    model_state, optim_state = get_state_dict(model, optimizer, options=_TRAINABLE)
    frozen = {
        name.removeprefix("module.")  # (DDP's wrapper; the state dict's names are the model's own)
        for name, param in model.named_parameters(remove_duplicate=False)
        if not param.requires_grad
    }
    return {k: v for k, v in model_state.items() if k not in frozen}, optim_state


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    model_state, optim_state = _trainable(model, optimizer)
    with _quiet():
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory), no_dist=_single())


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    # get_state_dict gives an optimizer without state some (zero-lr) state to load into.
    model_state, optim_state = _trainable(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _quiet():
        dcp.load(state, checkpoint_id=str(directory), no_dist=_single())
    # (not strict: the frozen parameters are not in it; dcp.load has already refused a checkpoint lacking a key)
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)


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
