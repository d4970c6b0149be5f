"""Saving what a run produces: the Hugging Face export (``final/``). Resumable checkpoints come later."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
TRAINING_INFO = "sftdist_training.json"


def export_hf(
    model: torch.nn.Module,
    state_dict: dict[str, torch.Tensor],
    tokenizer: Any,
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
    eos_token_ids: list[int] | None = None,
    training_info: dict | None = None,
) -> Path:
    """Write a Hugging Face directory (config, safetensors weights, tokenizer with its chat template).

    Floating-point weights are saved in ``dtype`` (the dtype the model came in); ``eos_token_ids`` become
    the generation config's stop tokens; ``training_info`` (the chat-template hash, the data fingerprint, ...)
    goes to ``sftdist_training.json``. Written to a temporary sibling first and renamed, so a crash never
    leaves a half-written ``out_dir``. Call on rank 0 only, with the full (gathered) ``state_dict``.
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
    if training_info is not None:
        (tmp / TRAINING_INFO).write_text(json.dumps(training_info, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    check_export_template(out_dir)
    return out_dir


def check_export_template(hf_dir: Path) -> bool:
    """Warn (and return False) when the chat template a Hugging Face directory serves with is not the one
    its model was trained with (``sftdist_training.json``): training text and serving text would differ."""
    info_file = Path(hf_dir) / TRAINING_INFO
    if not info_file.is_file():
        return True
    from transformers import AutoTokenizer

    from sftdist.data.template import resolve_chat_template, template_hash

    trained = json.loads(info_file.read_text()).get("template_hash")
    try:
        served = template_hash(resolve_chat_template(AutoTokenizer.from_pretrained(str(hf_dir))))
    except ValueError:
        served = None
    if trained is not None and served != trained:
        log.warning(
            "%s: the tokenizer's chat template (sha256:%s) is not the one the model was trained with "
            "(sha256:%s); the model will be served with prompts it was not trained on",
            hf_dir,
            served,
            trained,
        )
        return False
    return True
