"""The output head and the cross-entropy in one, in chunks of tokens: the (tokens x vocabulary) logits never exist.

For ``N`` tokens, hidden size ``H`` and vocabulary ``V``, the plain path materialises the logits (N x V), their
fp32 copy and the gradient of each: at 16k tokens x 128k vocabulary that is 8 GiB per fp32 tensor. Here the tokens
go through the head ``C`` at a time: a chunk's logits, its softmax and the gradients they give are computed and
dropped before the next chunk. The gradients are computed in the forward (the loss is a sum, so the backward only
scales them by the incoming gradient), which keeps the backward free of a second pass over the head and of any
saved logits. Peak extra memory: one chunk's logits (C x V, fp32) plus the gradients of the inputs (N x H and
V x H, the size of the inputs themselves).

The chunk is ``N / ceil(V / H)`` tokens rounded up to a power of two (so a chunk's logits are about the size of
the hidden states; Liger-Kernel's rule), but no smaller than a floor, because each chunk reads and writes the whole
fp32 weight gradient (V x H): the chunk's matrix products do ``6 C V H`` FLOPs for those ``8 V H`` bytes.
- On a CPU the floor is a chunk whose logits hold 2**25 values (128 MiB in fp32): smaller chunks made the layer twice
  as slow as the plain path.
- On a GPU (about 300 FLOPs per byte of memory traffic on an H100) the floor is 4096 tokens (then the gradient's
  traffic costs about a tenth of the products), unless the logits would then exceed 2**30 values (4 GiB in fp32).
  At 16k x 128k that is 4 chunks, not 32.
At most ``N``.

Dtypes follow what autocast does to a plain ``linear`` then ``cross_entropy(logits.float())``: the matrix
products run in ``compute_dtype`` (bf16 under autocast), the softmax and the loss in fp32, and the weight's
gradient is summed over chunks in fp32. Where torch can add a bf16 product into an fp32 tensor in one matrix
multiply (``torch.addmm(..., out_dtype=torch.float32)``: CUDA, and only from the torch version that accepts an fp32
``input`` there, found by trying it once per device type), the sum is done so. Otherwise each chunk's product is
made in bf16, then cast and added: three more passes over a weight-sized tensor.

:func:`linear_cross_entropy_reference` is the plain path, the one the chunked one is tested against.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
MIN_CHUNK_LOGITS = 2**25  # on a CPU, a chunk's logits hold at least this many values (see the module's docstring)
MIN_CHUNK_TOKENS_GPU = 4096  # on a GPU, a chunk has at least this many tokens,
MAX_FLOOR_LOGITS_GPU = 2**30  # unless its logits would then hold more than this many values
_FUSED_ACCUMULATE: dict[str, bool] = {}  # device type -> whether addmm adds a bf16 product into fp32 in place


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Sum of the token cross-entropies of ``hidden @ weight.T`` against ``targets`` (IGNORE_INDEX: not counted), in
    fp32, through the full logits. hidden: (N, H); weight: (V, H); targets: (N,)."""
    dtype = compute_dtype or hidden.dtype
    logits = F.linear(hidden.to(dtype), weight.to(dtype)).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunk_size(num_tokens: int, vocab: int, hidden: int, device_type: str = "cpu") -> int:
    """Tokens per chunk: a chunk's logits about the size of the hidden states, a power of two, no smaller than the
    device's floor, at most all."""
    size = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(num_tokens / math.ceil(vocab / hidden))))))
    if device_type == "cpu":
        floor = _power_of_two_below(MIN_CHUNK_LOGITS // vocab)
    else:
        floor = min(MIN_CHUNK_TOKENS_GPU, _power_of_two_below(MAX_FLOOR_LOGITS_GPU // vocab))
    return max(1, min(max(size, floor), num_tokens))


def _power_of_two_below(n: int) -> int:
    return 1 << max(0, int(math.log2(max(1, n))))


def fused_accumulate(device: torch.device) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` works here for an fp32 ``acc`` and bf16
    ``a``, ``b``: tried once per device type (CUDA only, and only in the torch versions whose check lets ``input`` be
    of ``out_dtype``)."""
    if device.type not in _FUSED_ACCUMULATE:
        acc = torch.ones(2, 2, device=device)
        ones = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
        try:
            torch.addmm(acc, ones, ones, out_dtype=torch.float32, out=acc)
            _FUSED_ACCUMULATE[device.type] = bool((acc == 3).all())
        except (RuntimeError, TypeError) as err:  # NotImplementedError (no kernel, as on a CPU) is a RuntimeError
            _FUSED_ACCUMULATE[device.type] = False
            if device.type != "cpu":  # (said once: the sum is made in bf16, cast and added instead; same result)
                log.info("chunked loss on %s: addmm cannot add into fp32 here (%s); casting and adding", device, err)
    return _FUSED_ACCUMULATE[device.type]


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    compute_dtype: torch.dtype | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """:func:`linear_cross_entropy_reference`, chunked over tokens, with its own backward. Same arguments; ``chunk``
    overrides :func:`chunk_size` (tests)."""
    if (
        hidden.dim() != 2
        or weight.dim() != 2
        or targets.shape != hidden.shape[:1]
        or hidden.shape[1] != weight.shape[1]
    ):
        raise ValueError(
            f"linear_cross_entropy: hidden (N, H), weight (V, H) and targets (N,) expected; got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(targets.shape)}"
        )
    dtype = compute_dtype or hidden.dtype
    size = chunk or chunk_size(hidden.shape[0], weight.shape[0], weight.shape[1], hidden.device.type)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, size)
    return _chunked(hidden, weight, targets, dtype, size, want_hidden=False, want_weight=False)[0]


def _chunked(hidden, weight, targets, dtype, size, want_hidden: bool, want_weight: bool):
    """(loss sum, its gradient for hidden or None, for weight (fp32) or None), one chunk of tokens at a time. No
    host synchronisation: tokens not counted are masked, not skipped."""
    w = weight.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    fused = want_weight and dtype != torch.float32 and fused_accumulate(weight.device)
    for start in range(0, hidden.shape[0], size):
        h = hidden[start : start + size].to(dtype)
        t = targets[start : start + size]
        keep = t != IGNORE_INDEX
        safe = t.masked_fill(~keep, 0)
        logits = F.linear(h, w).float()  # (C, V): the one chunk-sized tensor; everything below is in place over it
        target = logits.gather(1, safe[:, None])
        top = logits.amax(dim=-1, keepdim=True)
        exp_sum = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)  # logits now hold exp(logits - top)
        total += ((exp_sum.log() + top - target)[:, 0] * keep).sum()  # logsumexp - the target's logit
        if not (want_hidden or want_weight):
            continue
        # d(sum of CE)/d(logits) = softmax - one-hot, on the counted tokens only.
        grad_logits = logits.div_(exp_sum)
        grad_logits.scatter_add_(1, safe[:, None], torch.full_like(top, -1.0))
        grad_logits = grad_logits.mul_(keep[:, None]).to(dtype)
        if grad_hidden is not None:
            grad_hidden[start : start + size] = grad_logits @ w
        # The sum over chunks in place where torch can (no weight-sized temporary per chunk)
        if grad_weight is not None and dtype == torch.float32:
            grad_weight.addmm_(grad_logits.t(), h)
        elif grad_weight is not None and fused:
            torch.addmm(grad_weight, grad_logits.t(), h, out_dtype=torch.float32, out=grad_weight)
        elif grad_weight is not None:
            grad_weight += (grad_logits.t() @ h).float()
    return total, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, size):
        total, grad_hidden, grad_weight = _chunked(
            hidden, weight, targets, dtype, size, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grads = iter(ctx.saved_tensors)
        dh = next(grads) * grad_output.to(ctx.saved_tensors[0].dtype) if ctx.needs_input_grad[0] else None
        dw = (next(grads) * grad_output.float()).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None
