"""Saving what a run produces: the Hugging Face export (``final/``). Resumable checkpoints come later."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch


def export_hf(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], tokenizer: Any, out_dir: Path,
              dtype: torch.dtype = torch.float32, eos_token_ids: list[int] | None = None) -> Path:
    """Write a Hugging Face directory (config, safetensors weights, tokenizer with its chat template).

    Floating-point weights are saved in ``dtype`` (the dtype the model came in); ``eos_token_ids`` become
    the generation config's stop tokens. Written to a temporary sibling first and renamed, so a crash
    never leaves a half-written ``out_dir``. Call on rank 0 only, with the full (gathered) ``state_dict``.
    """
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.save_pretrained(str(tmp), state_dict=state_dict)
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    config.save_pretrained(str(tmp))
    if eos_token_ids and getattr(model, "generation_config", None) is not None:
        generation_config = copy.deepcopy(model.generation_config)
        generation_config.eos_token_id = eos_token_ids[0] if len(eos_token_ids) == 1 else list(eos_token_ids)
        generation_config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
