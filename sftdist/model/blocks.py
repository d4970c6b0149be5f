"""The model's decoder blocks, and what is done to each: activation checkpointing and compilation.

Both wrap a block's ``forward`` (not its ``__call__``), so that whatever hooks a strategy puts around the block
(FSDP2's gathers, ZeRO-3's fetches) stay outside: the recomputation in backward runs inside the block's own
backward, where its weights are gathered. Order, from the outside in: hooks -> checkpoint -> compiled forward.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from sftdist.errors import ConfigError

# Selective checkpointing keeps what is costly to recompute (matrix products, attention) and recomputes the rest
# (norms, activations, rotary embeddings, residual adds): most of full checkpointing's memory saving for a few
# percent of compute (the torchtitan/Megatron "selective" recipe).
_SAVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks, by the classes Hugging Face declares unsplittable (``_no_split_modules``):
    LlamaDecoderLayer, Qwen2DecoderLayer, ... with no per-model code."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers: list[torch.nn.Module] = []
    inside: set[int] = set()  # the outermost match only: a block nested in a chosen one is sharded with it
    for module in model.modules():  # parents come before their children
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            layers.append(module)
            inside.update(id(m) for m in module.modules())
    if not layers:
        raise ConfigError(
            f"found no decoder layers in {type(model).__name__} (its _no_split_modules is "
            f"{sorted(names) or 'empty'}): activation checkpointing, model.compile and strategy=fsdp2 need them"
        )
    return layers


# ... and the packed attention kernels, by name: their operators exist only once their library is loaded
# (torch.nn.attention.varlen's custom op; ATen's flash and cuDNN kernels under it; flash-attn's own custom ops)
_SAVE_NAMED = {
    "torch_attn::_varlen_attn",
    "aten::_flash_attention_forward",
    "aten::_cudnn_attention_forward",
    "flash_attn::_flash_attn_varlen_forward",
    "flash_attn::_flash_attn_forward",
}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    saved = op in _SAVE or getattr(op, "name", lambda: "")() in _SAVE_NAMED
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_blocks(model: torch.nn.Module, mode: str) -> None:
    """Activation checkpointing of every decoder block: ``full`` keeps only each block's input, ``selective`` also
    the matrix products' outputs; ``none`` does nothing."""
    if mode == "none":
        return
    context = functools.partial(create_selective_checkpoint_contexts, _policy) if mode == "selective" else None
    for layer in decoder_layers(model):
        inner = layer.forward
        kwargs = {"use_reentrant": False, **({"context_fn": context} if context else {})}
        layer.forward = functools.wraps(inner)(functools.partial(_checkpointed, inner, kwargs))


def _checkpointed(inner, kwargs, *args, **inputs):
    if not torch.is_grad_enabled():  # eval and generation: nothing to recompute
        return inner(*args, **inputs)
    return checkpoint(inner, *args, **kwargs, **inputs)


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` each decoder block's forward (shapes marked dynamic: packed micro-batches vary in length)."""
    for layer in decoder_layers(model):
        layer.forward = torch.compile(layer.forward, dynamic=True)
