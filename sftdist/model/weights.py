"""The weights a model is built with, read one tensor at a time (what fsdp2 and zero3 load into their shards):
from a model directory's safetensors files, or from the whole model built on CPU where those do not name them all."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sftdist.config import LoRAConfig, ModelConfig
from sftdist.model.build import build_tiny, load_pretrained, model_directory
from sftdist.model.lora import AdapterWeights, base_name, is_adapter

log = logging.getLogger(__name__)


def model_weights(cfg: ModelConfig, tokenizer: Any, seed: int, names: list[str]) -> ModelWeights:
    """The weights ``build_model`` would give the parameters and buffers ``names``, read one tensor at a time: from the
    model directory's safetensors files, or, where they do not name them all (a .bin checkpoint, renamed keys), from
    the whole model built on CPU, as is the tiny model (seeded as ever). With adapters, ``names`` are the adapted
    model's: the base's weights under them, and the adapters' first values (sftdist.model.lora.AdapterWeights)."""
    if cfg.lora.enabled:
        base_names = [base_name(n) for n in names if not is_adapter(n)]
        return AdapterWeights(base_model_weights(cfg, tokenizer, seed, base_names), names, seed)
    return base_model_weights(cfg, tokenizer, seed, names)


def base_model_weights(cfg: ModelConfig, tokenizer: Any, seed: int, names: list[str]) -> ModelWeights:
    """:func:`model_weights` of the base model (without adapters), by its own names."""
    if cfg.name_or_path is not None:
        files = ModelWeights.from_safetensors(model_directory(cfg.name_or_path))
        if files is not None and set(names) <= files.names:
            return files
        log.warning(
            "model.name_or_path=%s: its safetensors files do not hold every weight under the model's names; "
            "building the whole model on CPU to read them",
            cfg.name_or_path,
        )
    base = dataclasses.replace(cfg, lora=LoRAConfig())  # (the base's weights, never quantized)
    model = load_pretrained(base, tokenizer) if cfg.name_or_path is not None else build_tiny(cfg, tokenizer, seed)
    return ModelWeights.from_state_dict(model.state_dict())


class ModelWeights:
    """Named tensors read on demand (``get``: one fp32 tensor on CPU), from safetensors files or a state dict."""

    def __init__(self, names: set[str], get: Callable[[str], torch.Tensor]):
        self.names, self._get = names, get

    def get(self, name: str, shape: torch.Size | None = None) -> torch.Tensor:
        """``name``'s tensor in fp32; ValueError when it is not of ``shape`` (the model's parameter, where given)."""
        tensor = self._get(name).float()
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: the checkpoint's tensor is {tuple(tensor.shape)}, the model's {tuple(shape)}")
        return tensor

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ModelWeights:
        return cls(set(state), state.__getitem__)

    @classmethod
    def from_safetensors(cls, directory: Path) -> ModelWeights | None:
        """The safetensors checkpoint in ``directory`` (one file, or shards with their index), or None."""
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            where = {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif (directory / "model.safetensors").is_file():
            with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
                where = dict.fromkeys(f.keys(), directory / "model.safetensors")
        else:
            return None

        def get(name: str) -> torch.Tensor:
            with safe_open(str(where[name]), framework="pt") as f:
                return f.get_tensor(name)

        return cls(set(where), get)
