"""Building the tokenizer and the model: the tiny demo model from config, or a local HF directory; whole, or without
weights for a strategy that loads them (sftdist.model.weights) shard by shard."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sftdist.config import MODEL_EXECUTION_KEYS, DataConfig, ModelConfig
from sftdist.data.demo import DEMO_TOKENIZER_DIR
from sftdist.data.template import load_chat_template, resolve_chat_template
from sftdist.errors import ConfigError
from sftdist.model.blocks import checkpoint_blocks, compile_blocks
from sftdist.model.lora import add_adapters, init_adapters

log = logging.getLogger(__name__)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # one of them: a directory a fast tokenizer loads from


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

    if cfg.name_or_path is not None:
        model_directory(cfg.name_or_path)
    if cfg.tokenizer is not None:
        source, key = local_dir("model.tokenizer", cfg.tokenizer), "model.tokenizer"
    elif cfg.name_or_path is not None:
        source, key = local_dir("model.name_or_path", cfg.name_or_path), "model.name_or_path"
    else:
        source, key = DEMO_TOKENIZER_DIR, "the bundled demo tokenizer"
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{key}={str(source)!r}: no tokenizer files in it ({', '.join(TOKENIZER_FILES)})")
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


def build_model(cfg: ModelConfig, tokenizer: Any, seed: int, with_weights: bool = True) -> torch.nn.Module:
    """The model in fp32 on CPU: loaded from ``model.name_or_path``, or the tiny Llama initialised from ``seed``; with
    ``model.lora.enabled``, with its adapters (sftdist.model.lora; QLoRA: the base in 4-bit, on this process's GPU).
    ``with_weights=False``: its structure only, from the config, for a strategy that builds it in a context of its own
    (parameters on the meta device, or partitioned as they are made) and then loads
    :func:`sftdist.model.weights.model_weights` itself."""
    if not with_weights:
        with _no_init():  # (random init of parameters that are on meta, or partitioned: wasted, or it fails)
            model = _empty_model(cfg, tokenizer)
        model.tie_weights()  # (which no_init_weights skips with the init)
    elif cfg.name_or_path is not None:
        model = load_pretrained(cfg, tokenizer)
    else:
        model = build_tiny(cfg, tokenizer, seed)
    if cfg.lora.enabled:
        add_adapters(model, cfg.lora)
        if with_weights:
            init_adapters(model, seed)
    prepare_blocks(model, cfg)
    return model


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules made inside the block get their parameters on the meta device (no memory) and their buffers on CPU
    as usual: rotary tables and the like are computed, not loaded, and must stay real.

    Not accelerate's ``init_empty_weights(include_buffers=False)``: it wraps every registered parameter anew, also one
    already on meta, so tying the output head to the embedding (``lm_head.weight = embed.weight``) leaves two
    parameters, and a tied checkpoint no longer names them all (tests/distributed: the tied bf16 model's load). Only
    a parameter not yet on meta is replaced here."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def prepare_blocks(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """model.compile and activation checkpointing on the decoder blocks (sftdist.model.blocks)."""
    if cfg.compile:
        compile_blocks(model)
    checkpoint_blocks(model, activation_checkpointing(cfg))


def activation_checkpointing(cfg: ModelConfig) -> str:
    """none | full | selective: model.activation_checkpointing, or full for model.gradient_checkpointing=true."""
    return "full" if cfg.gradient_checkpointing else cfg.activation_checkpointing


def model_identity(cfg: ModelConfig, seed: int) -> str:
    """What determines the base model's weights as built: its directory's config and weight files (names, sizes,
    times) and whether it is quantized, or the tiny model's settings and seed."""
    if cfg.name_or_path is None:
        settings = {k: v for k, v in vars(cfg).items() if k not in MODEL_EXECUTION_KEYS and k != "lora"}
        return json.dumps({"tiny": settings, "seed": seed}, sort_keys=True, default=str)
    directory = local_dir("model.name_or_path", cfg.name_or_path)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
    identity: list[Any] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return json.dumps(identity + ([{"load_in_4bit": True}] if cfg.lora.load_in_4bit else []))


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
        raise FileNotFoundError(
            f"model.name_or_path={name_or_path!r} is not a Hugging Face model directory: it has no config.json"
        )
    return directory


def load_pretrained(cfg: ModelConfig, tokenizer: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    directory = model_directory(cfg.name_or_path)
    try:  # fp32 master weights whatever the checkpoint's dtype; precision=bf16 autocasts the compute
        model = AutoModelForCausalLM.from_pretrained(
            str(directory),
            dtype=torch.float32,
            attn_implementation="sdpa",
            trust_remote_code=cfg.trust_remote_code,
            **_quantization(cfg),
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: cannot load a causal LM from it ({err})") from err
    _check_vocabulary(cfg, model, tokenizer)
    return model


def _quantization(cfg: ModelConfig) -> dict[str, Any]:
    """QLoRA's loading arguments: the linear layers in 4-bit NF4 (double-quantized, computing in bf16), on this
    process's GPU (sftdist.model.lora.check_qlora has checked that there is one, and bitsandbytes)."""
    if not cfg.lora.load_in_4bit:
        return {}
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def _check_vocabulary(cfg: ModelConfig, model: torch.nn.Module, tokenizer: Any) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise ConfigError(
            f"model.name_or_path={cfg.name_or_path!r}: its embedding has {rows} rows but the tokenizer has "
            f"{len(tokenizer)} tokens"
        )


def _no_init() -> contextlib.AbstractContextManager:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # (older transformers)
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _empty_model(cfg: ModelConfig, tokenizer: Any) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    if cfg.name_or_path is None:
        return LlamaForCausalLM(_tiny_config(cfg, tokenizer))
    directory = model_directory(cfg.name_or_path)
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name_or_path={cfg.name_or_path!r}: cannot build a causal LM from it ({err})") from err
    _check_vocabulary(cfg, model, tokenizer)
    return model


def build_tiny(cfg: ModelConfig, tokenizer: Any, seed: int) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_tiny_config(cfg, tokenizer))
    return model


def _tiny_config(cfg: ModelConfig, tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
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


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position encoding is configured for, if it says."""
    return getattr(model.config, "max_position_embeddings", None)


def num_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameters of the whole model (``trainable_only``: those that require a gradient), also when they are on the
    meta device or partitioned by ZeRO-3."""
    return sum(parameter_numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def parameter_numel(param: torch.Tensor) -> int:
    """A parameter's logical size: whole for a ZeRO-3 partition, unpacked for a 4-bit (QLoRA) weight."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:
        return int(torch.Size(quant_state.shape).numel())
    return getattr(param, "ds_numel", param.numel())
