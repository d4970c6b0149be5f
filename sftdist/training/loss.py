"""The supervised-token loss and its normalisation: the one place either is computed.

Each micro-batch contributes the *sum* of token cross-entropies over its supervised targets, divided
by the number of supervised targets in the whole optimizer step. Summed over the micro-batches, that
is the token mean of the step, however the step's samples were cut into micro-batches: a short or
heavily masked micro-batch weighs exactly as much as its tokens, not as much as a long one.

The CE sum comes one of two ways (``train.loss_impl``):

- ``naive``: the model's logits for every position (tokens x vocabulary, plus an fp32 copy), then cross-entropy.
- ``chunked``: the model's output head computes the loss itself, on the supervised positions only and a chunk of
  them at a time (sftdist.kernels.linear_cross_entropy), so no logits tensor ever exists. The head is patched in
  place and runs inside the model's own forward, where every strategy has its weight gathered (FSDP2's root, a
  ZeRO-3 module hook); it behaves as before whenever no targets are set (generation, export).
- ``auto``: chunked where the model's head is a plain linear map whose output is the logits (checked at start by
  :func:`loss_impl`, with the model's own forward); otherwise naive.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from sftdist.data.template import IGNORE_INDEX
from sftdist.errors import ConfigError
from sftdist.kernels.linear_cross_entropy import linear_cross_entropy

# Config attributes of models whose forward post-processes the head's output (soft-capping, scaling, a bias):
# their logits are not ``hidden @ weight.T``, so the chunked loss would compute another function.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies over supervised targets, in fp32.

    logits: (R, L, V); targets: (R, L), already shifted (target t is the token after t), -100 to ignore.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def step_normalised_loss(ce_sum: torch.Tensor, num_step_tokens: int, grad_divisor: int = 1) -> torch.Tensor:
    """This micro-batch's share of the step loss, as handed to backward.

    ``ce_sum``: the micro-batch's CE sum (:func:`cross_entropy_sum`); ``num_step_tokens``: supervised tokens
    in the whole optimizer step, all micro-batches of all ranks; ``grad_divisor``: what the strategy's gradient
    reduction divides by (the world size for DDP, FSDP2 and ZeRO-3, which average over ranks). Summed over the
    micro-batches and reduced, the gradients are those of the step's token-mean loss on any topology.
    """
    assert num_step_tokens > 0, "an optimizer step without a supervised token"
    return ce_sum * (grad_divisor / num_step_tokens)


def chunked_loss_problem(model: torch.nn.Module) -> str | None:
    """Why the chunked loss cannot stand in for this model's logits, or None when it can."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        kind = f"{type(head).__module__}.{type(head).__name__}"  # (peft's adapted head is a Linear of its own)
        return f"{type(model).__name__} has no plain nn.Linear output head ({kind})"
    if head.bias is not None:
        return f"{type(model).__name__}'s output head has a bias"
    config = getattr(model, "config", None)
    for key in _LOGIT_POSTPROCESSING:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0, False):
            return f"{type(model).__name__} post-processes its logits (config.{key}={value})"
    return None


def install_loss_head(model: torch.nn.Module) -> None:
    """Make ``model``'s output head compute the CE sum of the supervised positions when :func:`supervised_targets`
    has set them (and the plain linear map otherwise). Call it on the Hugging Face model, before or after the
    strategy wraps it (the head module stays the same object)."""
    head = model.get_output_embeddings()
    head.sftdist_targets = None
    head.forward = types.MethodType(_head_forward, head)


def _head_forward(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    if head.sftdist_targets is None:
        return F.linear(hidden, head.weight)
    index, targets = head.sftdist_targets
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(hidden.dtype, head.weight.dtype)
    with torch.autocast(device, enabled=False):
        return linear_cross_entropy(hidden.flatten(0, -2).index_select(0, index), head.weight, targets, dtype)


@contextlib.contextmanager
def supervised_targets(model: torch.nn.Module, targets: torch.Tensor, index: torch.Tensor) -> Iterator[None]:
    """Within the block, ``model``'s forward returns, in place of its logits, the CE sum of the targets at the flat
    positions ``index`` (``targets`` (R, L) with -100 elsewhere; the index comes from the host, see MicroBatch)."""
    head = model.get_output_embeddings()
    head.sftdist_targets = (index, targets.flatten().index_select(0, index))
    try:
        yield
    finally:
        head.sftdist_targets = None


def loss_impl(
    requested: str, model: torch.nn.Module, naive_and_chunked: Callable[[], tuple[float, float]]
) -> tuple[str, str]:
    """(the loss implementation a run uses, why): ``requested`` is train.loss_impl; ``naive_and_chunked`` computes a
    small batch's CE sum both ways through the strategy's model (after :func:`install_loss_head`), which must agree:
    that proves the head's output is what the model returns as logits."""
    if requested == "naive":
        return "naive", "train.loss_impl=naive"
    problem = chunked_loss_problem(model)
    if problem is None:
        naive, chunked = naive_and_chunked()
        if not abs(chunked - naive) <= 1e-3 * abs(naive):
            problem = f"its forward does not return the head's output as logits (CE {naive:.6g} naive, {chunked:.6g})"
    if problem is None:
        return "chunked", "the output head on supervised tokens only, in chunks"
    if requested == "chunked":
        raise ConfigError(f"train.loss_impl=chunked: {problem}; use train.loss_impl=naive (or auto)")
    return "naive", f"train.loss_impl=auto: naive, since {problem}"
