"""The model: its tokenizer and build (build.py), the weights it loads (weights.py), packed attention, its decoder
blocks and LoRA."""

from sftdist.model.build import (
    activation_checkpointing,
    build_model,
    build_tokenizer,
    checkpoint_dtype,
    local_dir,
    max_positions,
    model_directory,
    model_identity,
    num_parameters,
    pad_token_id,
    parameter_numel,
    parameters_on_meta,
)
from sftdist.model.weights import ModelWeights, base_model_weights, model_weights

__all__ = [
    "ModelWeights",
    "activation_checkpointing",
    "base_model_weights",
    "build_model",
    "build_tokenizer",
    "checkpoint_dtype",
    "local_dir",
    "max_positions",
    "model_directory",
    "model_identity",
    "model_weights",
    "num_parameters",
    "pad_token_id",
    "parameter_numel",
    "parameters_on_meta",
]
