"""Context parallelism (``strategy.context_parallel`` = cp > 1): each packed row of a micro-batch is split over the cp
ranks of a context-parallel group, so that a row's activations need not fit on one device.

The ranks ``cp * g ... cp * g + cp - 1`` form group g; the micro-batches of a step are dealt to the world / cp groups
(data parallelism), and every rank of a group gets the same ones, each its own shard of every row
(sftdist.data.batching.shard_packed). The row is collated whole first (the targets shifted within each sample, never
again), then each sample is padded with unsupervised
tokens to a multiple of 2 * cp and cut into 2 * cp chunks: chunk c and chunk 2 * cp - 1 - c go to rank c, so that
every rank holds as much of the causal attention's work (early and late tokens alike) as the others. Position ids
are sharded by the same index (RoPE then needs nothing). The pads sit at the end of their sample: they see it, no
real token sees them, and they have no target.

Attention ("allgather"): each rank gathers the keys and values of its group (an autograd all-gather: the gradients of
the other ranks' keys and values flow back to them) and attends with its own queries under the row's packed mask,
its rows the rank's positions and its columns the gathered ones (sftdist.model.attention): no token attends across
samples, whatever the shard boundaries. The loss needs nothing: each supervised token is on exactly one rank, so the
step's count (summed over all ranks) counts it once, and the gradient reduction over the whole world sums every
rank's part. Eval and the generation probes run without it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def context_group(context_parallel: int) -> Any:
    """This rank's group of ``context_parallel`` consecutive ranks (every rank creates every group, as torch
    requires)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for first in range(0, world, context_parallel):
        group = dist.new_group(list(range(first, first + context_parallel)))
        if first <= rank < first + context_parallel:
            mine = group
    return mine


class _Gather(torch.autograd.Function):
    """All-gather along the sequence (dim 2) in the forward; in the backward, each rank gets the sum over the group of
    the gradients of its own shard (a reduce-scatter: NCCL's, or on gloo an all-reduce and this rank's slice)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shards, tensor, group=group)
        return torch.cat(shards, dim=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            mine = torch.empty_like(grad.chunk(size, dim=2)[rank]).contiguous()
            dist.reduce_scatter(mine, [c.contiguous() for c in grad.chunk(size, dim=2)], group=ctx.group)
            return mine, None
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(size, dim=2)[rank].contiguous(), None


def gather(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """The group's shards of ``tensor`` (1, H, T / cp, D) side by side along the sequence, in rank order; the
    gradient of each shard goes back to its rank, summed over the group."""
    return _Gather.apply(tensor.contiguous(), group)
