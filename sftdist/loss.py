"""The supervised-token loss and its normalisation: the one place either is computed.

Each micro-batch contributes the *sum* of token cross-entropies over its supervised targets, divided
by the number of supervised targets in the whole optimizer step. Summed over the micro-batches, that
is the token mean of the step, however the step's samples were cut into micro-batches: a short or
heavily masked micro-batch weighs exactly as much as its tokens, not as much as a long one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftdist.data.template import IGNORE_INDEX


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
