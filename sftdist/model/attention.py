"""Attention over packed micro-batches: no token ever attends to another sample.

A packed micro-batch is one row of several samples back to back, described by ``cu_seqlens`` (sample
boundaries) and ``position_ids`` that restart at each sample. Restarting positions is not enough: the
sdpa/eager/flex paths of transformers let the second sample attend to the first (FACTS.md measured the
damage); the block-diagonal structure is ours to enforce. The backends, registered in transformers'
``AttentionInterface`` so that any model written against it (Llama, Qwen2, Mistral, Gemma, ...) uses them
with no model-specific code:

- ``flash_attn``: flash-attn's ``flash_attn_varlen_func`` (CUDA, when installed);
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA);
- ``flex``: ``flex_attention`` with a document mask (compiled on CUDA; on CPU torch 2.13 runs it forward only,
  with no backward, so it cannot train there);
- ``sdpa``: ``scaled_dot_product_attention`` with an explicit block-diagonal causal mask: the reference, and
  what trains on CPU.

``model.attn_impl=auto`` picks the first that can train: flash_attn, torch_varlen, flex on CUDA; sdpa on CPU.
:func:`packed_attention_kwargs` is the one place that turns a micro-batch's boundaries into what the backends read;
the model and the loss never see it.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from sftdist.config import ATTENTION_BACKENDS

log = logging.getLogger(__name__)
# Names in transformers' registries. transformers reads meaning into substrings ("sdpa", "flash",
# "flex_attention": support checks and special paths), so ours contain none of them.
_REGISTERED = {
    "sdpa": "sftdist_packed_dense",
    "flex": "sftdist_packed_docmask",
    "torch_varlen": "sftdist_packed_tvarlen",
    "flash_attn": "sftdist_packed_fa",
}


class PackedAttention:
    """What the backends read about one packed row; masks are built on first use and kept for every layer.

    Not a dataclass on purpose: FSDP2 casts each wrapped block's inputs with ``_apply_to_tensors``, which rebuilds a
    dataclass (and its cache dict) at every block, so each layer would build the masks again; an object of a plain
    class is passed through as it is."""

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, total: int, context: Any = None, group: Any = None):
        self.cu_seqlens = cu_seqlens  # (N + 1,) int32: sample boundaries
        self.max_seqlen = max_seqlen
        self.total = total  # tokens in the row
        self.context, self.group = context, group  # context parallelism: this rank's shard, its group
        self._cache: dict = {}

    def document_ids(self) -> torch.Tensor:  # (T,) the sample each token belongs to
        if "doc" not in self._cache:
            lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
            self._cache["doc"] = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
        return self._cache["doc"]

    def dense_mask(self, sliding_window: int | None) -> torch.Tensor:  # (1, 1, T, T) bool, True = may attend
        key = ("dense", sliding_window)
        if key not in self._cache:
            doc = self.document_ids()
            pos = torch.arange(self.total, device=doc.device)
            mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
            if sliding_window is not None:
                mask &= pos[:, None] - pos[None, :] < sliding_window
            self._cache[key] = mask[None, None]
        return self._cache[key]

    def context_mask(self, sliding_window: int | None) -> torch.Tensor:  # (1, 1, T / cp, T) bool
        """Context parallelism: the packed mask's rows of this rank's positions, its columns in gathered order."""
        key = ("context", sliding_window)
        if key not in self._cache:
            doc, q, k = self.document_ids(), self.context.local, self.context.gathered
            mask = (doc[q][:, None] == doc[k][None, :]) & (q[:, None] >= k[None, :])
            if sliding_window is not None:
                mask &= q[:, None] - k[None, :] < sliding_window
            self._cache[key] = mask[None, None]
        return self._cache[key]

    def block_mask(self, sliding_window: int | None) -> Any:
        key = ("block", sliding_window)
        if key not in self._cache:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = self.document_ids()

            def document_causal(b, h, q, kv):
                allowed = (doc[q] == doc[kv]) & (q >= kv)
                return allowed & (q - kv < sliding_window) if sliding_window is not None else allowed

            self._cache[key] = create_block_mask(document_causal, None, None, self.total, self.total, device=doc.device)
        return self._cache[key]


def packed_attention_kwargs(
    cu_seqlens: torch.Tensor, max_seqlen: int, total: int | None = None, context: Any = None, group: Any = None
) -> dict[str, Any]:
    """The keyword arguments a packed forward passes to the model (they reach the attention backend). ``total``, the
    row's tokens, is known on the host (the row's width): reading it from a device copy of ``cu_seqlens`` would make
    the host wait for the device at every micro-batch. ``context``, ``group``: a context-parallel shard of the row
    (sftdist.data.batching.ContextShard) and its group (sftdist.parallel.context)."""
    total = int(cu_seqlens[-1]) if total is None else int(total)
    return {"sftdist_packed": PackedAttention(cu_seqlens.to(torch.int32), int(max_seqlen), total, context, group)}


def _meta(kwargs: dict) -> PackedAttention:
    meta = kwargs.get("sftdist_packed")
    if meta is None:
        raise ValueError(
            "an sftdist attention backend was called without packed-sequence metadata; "
            "packed micro-batches must come through sftdist.model.attention.packed_attention_kwargs"
        )
    return meta


def _check_row(query: torch.Tensor, meta: PackedAttention, context: bool = False) -> None:
    """One packed row: all of it, or (``context``: the backend has a context-parallel form) a rank's shard."""
    if meta.context is not None and not context:
        raise ValueError("this attention backend has no context-parallel form; strategy.context_parallel needs sdpa")
    width = meta.context.local.numel() if meta.context is not None else meta.total
    assert query.shape[0] == 1 and query.shape[2] == width, (query.shape, width)


def sdpa_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, softcap=None, **kwargs
):
    """The reference: SDPA with an explicit block-diagonal causal mask. q, k, v: (1, H, T, D). Under context
    parallelism (a shard of the row) the keys and values of the group are gathered first (the "allgather" scheme)."""
    meta = _meta(kwargs)
    _check_row(query, meta, context=True)
    if meta.context is not None:
        from sftdist.parallel.context import gather

        key, value = gather(key, meta.group), gather(value, meta.group)
        mask = meta.context_mask(sliding_window)
    else:
        mask = meta.dense_mask(sliding_window)
    if softcap is not None:  # SDPA cannot cap scores: the same math, unfused
        groups = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = torch.matmul(query, k.transpose(-1, -2)) * (
            scaling if scaling is not None else query.shape[-1] ** -0.5
        )
        scores = softcap * torch.tanh(scores / softcap)
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(query.dtype)
        out = torch.matmul(F.dropout(probs, dropout, module.training), v)
    else:
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )
    return out.transpose(1, 2).contiguous(), None


_COMPILED_FLEX: list[Callable] = []


def _flex_function(device: torch.device) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":  # unfused on CPU: exact, fine for small models and tests; no warning each call

        def eager(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                return flex_attention(*args, **kwargs)

        return eager
    if not _COMPILED_FLEX:
        _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=True))
    return _COMPILED_FLEX[0]


def _softcap_mod(softcap: float | None) -> Callable | None:
    if softcap is None:
        return None

    def capped(score, b, h, q, kv):
        return softcap * torch.tanh(score / softcap)

    return capped


def flex_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, softcap=None, **kwargs
):
    """flex_attention with a document mask (and sliding window / soft-capping when the model has them)."""
    if dropout:
        raise ValueError("model.attn_impl=flex does not support attention dropout; use sdpa or set it to 0")
    meta = _meta(kwargs)
    _check_row(query, meta)
    out = _flex_function(query.device)(
        query,
        key,
        value,
        score_mod=_softcap_mod(softcap),
        block_mask=meta.block_mask(sliding_window),
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def _flash_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v as the flash kernels take them: (T, H, D), all of one dtype, fp16 or bf16. Under autocast the
    projections come out in its dtype but RoPE leaves q and k in fp32 (fp32 master weights), and autocast does not
    cast for these kernels: so the autocast dtype; outside autocast, the value's dtype, which must be a half one."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else value.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"the flash attention kernels take fp16 or bf16, not {dtype}: use precision=bf16, or model.attn_impl=flex "
            "(or auto, which picks flex in fp32)"
        )
    return tuple(t[0].transpose(0, 1).to(dtype) for t in (query, key, value))


_TAKES_GQA_FLAG: dict[Any, bool] = {}


def _takes_gqa_flag(function: Callable) -> bool:
    """Whether varlen_attn has ``enable_gqa`` (torch 2.12 on; 2.11's broadcasts key/value heads without it)."""
    if function not in _TAKES_GQA_FLAG:
        import inspect

        _TAKES_GQA_FLAG[function] = "enable_gqa" in inspect.signature(function).parameters
    return _TAKES_GQA_FLAG[function]


def torch_varlen_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, softcap=None, **kwargs
):
    """torch.nn.attention.varlen.varlen_attn (CUDA). q: (1, H, T, D) -> (T, H, D) and back."""
    from torch.nn.attention.varlen import varlen_attn

    if dropout or softcap is not None:
        raise ValueError("model.attn_impl=torch_varlen supports neither attention dropout nor soft-capping; use flex")
    meta = _meta(kwargs)
    _check_row(query, meta)
    q, k, v = _flash_inputs(query, key, value)
    cu = meta.cu_seqlens
    window = (sliding_window - 1 if sliding_window is not None else -1, 0)  # (-1, 0): causal
    gqa = {"enable_gqa": k.shape[1] != q.shape[1]} if _takes_gqa_flag(varlen_attn) else {}
    out = varlen_attn(q, k, v, cu, cu, meta.max_seqlen, meta.max_seqlen, scale=scaling, window_size=window, **gqa)
    return out[None], None


def flash_attn_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, softcap=None, **kwargs
):
    """flash-attn's flash_attn_varlen_func (CUDA, fp16/bf16). q: (1, H, T, D) -> (T, H, D) and back."""
    from flash_attn import flash_attn_varlen_func

    meta = _meta(kwargs)
    _check_row(query, meta)
    q, k, v = _flash_inputs(query, key, value)
    cu = meta.cu_seqlens
    window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        cu,
        cu,
        meta.max_seqlen,
        meta.max_seqlen,
        dropout_p=dropout,
        softmax_scale=scaling,
        causal=True,
        window_size=window,
        softcap=softcap if softcap is not None else 0.0,
    )
    return out[None], None


_FORWARDS = {
    "sdpa": sdpa_forward,
    "flex": flex_forward,
    "torch_varlen": torch_varlen_forward,
    "flash_attn": flash_attn_forward,
}


def _no_mask(*args, **kwargs):
    """Mask factory for our names: transformers builds no mask; the backend reads the packed metadata."""
    return None


def available(backend: str, device: torch.device, precision: str = "bf16") -> str | None:
    """None when ``backend`` can train on ``device`` in ``precision``, else the reason it cannot."""
    if backend == "sdpa":
        return None
    if backend == "flex":
        return None if device.type == "cuda" else "flex_attention has no backward on CPU in this torch (use sdpa)"
    if device.type != "cuda":
        return f"{backend} needs a CUDA device"
    if precision == "fp32":
        return f"{backend}'s kernels take fp16 or bf16 only, and precision=fp32"
    if backend == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            return "flash-attn is not installed (pip install 'sftdist[gpu]')"
        try:  # (installed is not importable: a build for another torch or CUDA fails here, not in the first forward)
            from flash_attn import flash_attn_varlen_func  # noqa: F401
        except Exception as err:
            return f"flash-attn does not import: {type(err).__name__}: {str(err)[:200]}"
    if backend == "torch_varlen" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"this torch ({torch.__version__}) has no torch.nn.attention.varlen"
    return None


def resolve_backend(name: str, device: torch.device, precision: str = "bf16") -> str:
    """model.attn_impl -> the backend to use: ``auto`` picks flash_attn, torch_varlen, then flex (on CUDA; each one
    passed over is said in the log, with why), sdpa on CPU."""
    if name == "auto":
        for backend in ATTENTION_BACKENDS:
            reason = available(backend, device, precision)
            if reason is None:
                return backend
            if device.type == "cuda":
                log.info("attention: not %s: %s", backend, reason)
        raise AssertionError("sdpa is always available")
    reason = available(name, device, precision)
    if reason is not None:
        from sftdist.errors import ConfigError

        raise ConfigError(f"model.attn_impl={name!r}: {reason}; model.attn_impl=auto picks what can run")
    return name


def apply_packed_attention(model: torch.nn.Module, backend: str) -> str:
    """Register ``backend`` with transformers and switch ``model`` to it; returns the registered name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = _REGISTERED[backend]
    AttentionInterface.register(name, _FORWARDS[backend])
    AttentionMaskInterface.register(name, _no_mask)
    model.set_attn_implementation(name)
    return name


@contextmanager
def standard_attention(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, ``model`` attends as transformers' sdpa does, masks from ``attention_mask`` included (what
    generation with a KV cache and padded prompts needs); the packed backend, if any, is back after it."""
    current = getattr(model.config, "_attn_implementation", None)
    if current not in _REGISTERED.values():
        yield
        return
    model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation(current)
