"""LoRA on a CUDA device in bf16, and QLoRA (a 4-bit base through bitsandbytes; skipped where it does not import)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import compose, fit_and_close, read_metrics, save_tiny_model
from sftdist.training import Trainer

RUN = ("device=cuda", "precision=bf16", "eval.every_steps=0", "wandb.mode=disabled", "model.lora.enabled=true")


def test_lora_learns_in_bf16_on_cuda(tmp_path):
    fit_and_close(Trainer(compose(*RUN, "train.max_steps=30", "train.lr=3e-3", f"output_dir={tmp_path}")))
    losses = [m["train/loss"] for m in read_metrics(tmp_path)]
    assert losses[-1] < losses[0] - 0.5, losses
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "final_merged" / "model.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_trains_adapters_on_a_4bit_base_and_exports_them(tmp_path):
    import bitsandbytes as bnb

    save_tiny_model(tmp_path / "base", dtype=torch.bfloat16)
    args = (*RUN, f"model.name_or_path={tmp_path / 'base'}", "model.lora.load_in_4bit=true", "data.max_length=512")
    trainer = Trainer(compose(*args, "train.max_steps=20", "train.lr=3e-3", f"output_dir={tmp_path / 'run'}"))
    layers = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == trainer.model.config.num_hidden_layers * 7  # every linear layer of the blocks is 4-bit
    fit_and_close(trainer)
    losses = [m["train/loss"] for m in read_metrics(tmp_path / "run")]
    assert losses[-1] < losses[0], losses
    config = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    merged_config = json.loads((tmp_path / "run" / "final_merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config  # the merged model is plain bf16
    merged = load_file(str(tmp_path / "run" / "final_merged" / "model.safetensors"))
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
