"""Saving what a run produces: the Hugging Face export (``final/``). Resumable checkpoints come later."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch


def export_hf(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], tokenizer: Any, out_dir: Path) -> Path:
    """Write a Hugging Face directory (config, safetensors weights, tokenizer with its chat template).

    Written to a temporary sibling first and renamed, so a crash never leaves a half-written ``out_dir``.
    Call on rank 0 only, with the full (gathered) ``state_dict``.
    """
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), state_dict=state_dict)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
