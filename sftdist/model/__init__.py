"""Building the tokenizer and the model: the tiny demo model from config, or a local HF directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sftdist.config import DataConfig, ModelConfig
from sftdist.data.demo import DEMO_TOKENIZER_DIR
from sftdist.data.template import load_chat_template, resolve_chat_template
from sftdist.errors import ConfigError
from sftdist.model.blocks import checkpoint_blocks, compile_blocks


def local_dir(key: str, path: str) -> Path:
    """``path`` as a directory; FileNotFoundError naming ``key`` when there is none."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{key}={path!r}: no such directory (models load from local Hugging Face directories; "
            "nothing is downloaded from a hub)"
        )
    return directory


def build_tokenizer(cfg: ModelConfig, data_cfg: DataConfig) -> tuple[Any, str]:
    """(tokenizer, chat template). data.chat_template overrides the tokenizer's own template, and is
    set on the tokenizer so that the exported model serves with the template it was trained with
    (otherwise the tokenizer keeps its templates as they are, named ones included)."""
    from transformers import AutoTokenizer

    if cfg.tokenizer is not None:
        source, key = local_dir("model.tokenizer", cfg.tokenizer), "model.tokenizer"
    elif cfg.name_or_path is not None:
        source, key = local_dir("model.name_or_path", cfg.name_or_path), "model.name_or_path"
    else:
        source, key = DEMO_TOKENIZER_DIR, "the bundled demo tokenizer"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}={str(source)!r}: cannot load a tokenizer from it ({err})") from err
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{key}={str(source)!r}: sftdist needs a fast (tokenizer.json) tokenizer")
    override = load_chat_template(data_cfg.chat_template)
    template = resolve_chat_template(tokenizer, override)
    if override is not None:
        tokenizer.chat_template = override
    return tokenizer, template


def pad_token_id(tokenizer: Any) -> int:
    """The id used for padding slots; any id works since padding is neither attended to nor supervised."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def build_model(cfg: ModelConfig, tokenizer: Any, seed: int) -> torch.nn.Module:
    """The model in fp32 on CPU: loaded from ``model.name_or_path``, or the tiny Llama initialised from ``seed``."""
    model = _load_model(cfg, tokenizer) if cfg.name_or_path is not None else _tiny_model(cfg, tokenizer, seed)
    prepare_blocks(model, cfg)
    return model


def prepare_blocks(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """model.compile and activation checkpointing on the decoder blocks (sftdist.model.blocks)."""
    if cfg.compile:
        compile_blocks(model)
    checkpoint_blocks(model, activation_checkpointing(cfg))


def activation_checkpointing(cfg: ModelConfig) -> str:
    """none | full | selective: model.activation_checkpointing, or full for model.gradient_checkpointing=true."""
    return "full" if cfg.gradient_checkpointing else cfg.activation_checkpointing


def checkpoint_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype the model's weights came in (a bf16 checkpoint is exported in bf16), fp32 for the tiny model."""
    if cfg.name_or_path is None:
        return torch.float32
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def model_directory(name_or_path: str) -> Path:
    """``model.name_or_path`` as a Hugging Face model directory (one with a config.json), or FileNotFoundError."""
    directory = local_dir("model.name_or_path", name_or_path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"model.name_or_path={name_or_path!r}: no config.json in it")
    return directory


def _load_model(cfg: ModelConfig, tokenizer: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    directory = model_directory(cfg.name_or_path)
    try:  # fp32 master weights whatever the checkpoint's dtype; precision=bf16 autocasts the compute
        model = AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: cannot load a causal LM from it ({err})") from err
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path!r}: its embedding has "
            f"{model.get_input_embeddings().num_embeddings} rows but the tokenizer has {len(tokenizer)} tokens"
        )
    return model


def _tiny_model(cfg: ModelConfig, tokenizer: Any, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id(tokenizer),
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position encoding is configured for, if it says."""
    return getattr(model.config, "max_position_embeddings", None)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
