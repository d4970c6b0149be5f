"""LoRA adapters (``model.lora.*``) through peft, on the model in place.

peft's ``inject_adapter_in_model`` wraps each target linear layer: its weight becomes ``<module>.base_layer.weight``
(frozen) beside ``<module>.lora_A.default.weight`` (r x in) and ``<module>.lora_B.default.weight`` (out x r), and the
layer computes ``base(x) + B(A(dropout(x))) * alpha / r``. The model stays the Hugging Face class it was (generation,
its config, the output head the chunked loss patches), so every strategy wraps it as it wraps a plain model; the
optimizer sees only the adapters, which are all that requires a gradient.

The adapters' first values do not come from the global RNG or the strategy's construction (meta device, zero.Init):
:func:`initial_adapter` draws each from the seed and its name (A as peft does, uniform in +-1/sqrt(in); B zero), and
:class:`AdapterWeights` serves them, with the base weights under the names the adapters give them, to whatever loads
the model. So a run starts from the same adapters on any strategy and any number of processes.

Exports: the adapter in peft's format (``adapter_config.json``, ``adapter_model.safetensors``: what
``PeftModel.from_pretrained`` loads on the base), and the merged model (``W + B @ A * alpha / r`` in fp32).
"""

from __future__ import annotations

import importlib.util
import math
import zlib
from pathlib import Path
from typing import Any

import torch

from sftdist.config import LoRAConfig
from sftdist.errors import ConfigError

ADAPTER_NAME = "default"  # peft's name of the one adapter
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_BASE_LAYER = ".base_layer."
_PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before every key


def is_adapter(name: str) -> bool:
    """Whether ``name`` (a parameter of the model with adapters) is an adapter weight."""
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """The base model's name of a wrapped layer's weight (``q_proj.base_layer.weight`` -> ``q_proj.weight``)."""
    return name.replace(_BASE_LAYER, ".")


def peft_config(cfg: LoRAConfig, base_model_name_or_path: str | None = None) -> Any:
    from peft import LoraConfig

    targets = cfg.target_modules
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )


def add_adapters(model: torch.nn.Module, cfg: LoRAConfig) -> None:
    """Wrap the target layers of ``model`` with adapters, in place; the base weights are frozen. peft's own random
    first values are drawn from a forked RNG (the run's stream is untouched) and replaced when the model is loaded."""
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        try:
            inject_adapter_in_model(peft_config(cfg), model, adapter_name=ADAPTER_NAME)
        except ValueError as err:  # no module matches
            linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ConfigError(
                f"model.lora.target_modules={list(cfg.target_modules)}: {err}; the model's linear layers are named "
                f"{', '.join(linear)}"
            ) from err
    _check_adapted_layers(model, cfg)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))


def _check_adapted_layers(model: torch.nn.Module, cfg: LoRAConfig) -> None:
    """Adapters on plain linear layers only (what the seeded first values and the merge are for): an embedding, a
    convolution, a transposed (Conv1D) layer or a weight tied to the input embedding is refused, naming it."""
    embedding = model.get_input_embeddings().weight
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        base = module.get_base_layer()
        problem = None
        if not isinstance(base, torch.nn.Linear) or getattr(module, "fan_in_fan_out", False):
            problem = f"is a {type(base).__name__}, not a linear layer"
        elif base.weight is embedding:
            problem = "shares its weight with the input embedding (tie_word_embeddings), which stays frozen"
        if problem:
            raise ConfigError(
                f"model.lora.target_modules={list(cfg.target_modules)}: {name} {problem}; adapters go on linear "
                "layers (all-linear: every one of the decoder blocks)"
            )


def initial_adapter(name: str, shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    """The adapter ``name``'s first value: lora_B zero (the model starts as the base), lora_A uniform in
    +-1/sqrt(in_features) (peft's kaiming_uniform(a=sqrt(5))), drawn from ``seed`` and the name alone."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def init_adapters(model: torch.nn.Module, seed: int) -> None:
    """Give a model built with its weights its adapters' first values (:func:`initial_adapter`)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_adapter(name):
                param.copy_(initial_adapter(name, param.shape, seed))


class AdapterWeights:
    """The weights of a model with adapters, read on demand (sftdist.model.ModelWeights' interface): the base's
    under the wrapped names, the adapters' first values drawn (:func:`initial_adapter`)."""

    def __init__(self, base: Any, names: list[str], seed: int):
        self.base, self.seed = base, seed
        self.names = set(base.names) | {n for n in names if is_adapter(n) or base_name(n) in base.names}

    def get(self, name: str, shape: torch.Size | None = None) -> torch.Tensor:
        if is_adapter(name):
            if shape is None:
                raise ValueError(f"{name}: an adapter's first value needs its shape")
            return initial_adapter(name, shape, self.seed)
        return self.base.get(base_name(name), shape)


def merge(base: Any, names: list[str], adapters: dict[str, torch.Tensor], cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """The base weights ``names`` (its own names; ``base``: a ModelWeights) with the adapters merged in, in fp32:
    ``W + B @ A * alpha / r`` for every adapted layer."""
    scaling = cfg.alpha / cfg.r
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapters.items():
        module, which = key.split(".lora_")[0], key.split(".lora_")[1][0]  # (".lora_A.default.weight" -> "A")
        pairs.setdefault(f"{module}.weight", {})[which] = value.float()
    missing = sorted(set(pairs) - set(names))
    if missing:
        raise ValueError(f"adapters for weights the base model does not have: {', '.join(missing[:4])}")
    merged = {}
    for name in names:
        weight = base.get(name)
        if name in pairs:
            weight = weight + (pairs[name]["B"] @ pairs[name]["A"]) * scaling
        merged[name] = weight
    return merged


def write_adapter(out_dir: Path, adapters: dict[str, torch.Tensor], cfg: LoRAConfig, base: str | None) -> None:
    """``adapter_config.json`` and ``adapter_model.safetensors`` as ``PeftModel.save_pretrained`` writes them: keys
    ``base_model.model.<module>.lora_A.weight``, ``base`` (the base model's directory; None for the tiny demo model,
    which ``sftdist.model.build_model`` rebuilds from the seed) recorded as ``base_model_name_or_path``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        _PEFT_PREFIX + key.replace(f".{ADAPTER_NAME}.", "."): value.detach().contiguous()
        for key, value in adapters.items()
    }
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = peft_config(cfg, str(Path(base).expanduser().resolve()) if base is not None else None)
    config.target_modules = sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in adapters})  # (as peft saves)
    config.save_pretrained(str(out_dir))


def check_qlora(cfg: LoRAConfig, name_or_path: str | None, strategy: str, device: torch.device) -> None:
    """QLoRA (``model.lora.load_in_4bit``) where it can run: CUDA, bitsandbytes, one process or ddp, a model
    directory; ConfigError saying what is missing otherwise."""
    if not cfg.load_in_4bit:
        return
    where = "model.lora.load_in_4bit=true (QLoRA)"
    if device.type != "cuda":
        raise ConfigError(f"{where} needs a CUDA device (bitsandbytes' 4-bit kernels); this run is on {device.type}")
    if strategy not in ("none", "ddp"):
        raise ConfigError(
            f"{where} runs with strategy=none or ddp; with strategy={strategy} the 4-bit base cannot be sharded "
            "exactly: use LoRA without 4-bit, or ddp"
        )
    if name_or_path is None:
        raise ConfigError(f"{where} quantizes a pretrained model: set model.name_or_path")
    for package in ("bitsandbytes", "accelerate"):  # (transformers' 4-bit loading needs both)
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"{where} needs {package}, which is not installed: pip install 'sftdist[qlora]'")
