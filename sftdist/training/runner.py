"""The model, built for the strategy (``build_runner``), and its numerics: the forward under autocast, the loss
implementation and its choice, a step's gradients over its micro-batches, and eval's loss sums.

A step on every rank (``train_step``)::

    N = all_sum(supervised tokens of this rank's micro-batches)       # before any backward, counts from the host
    for mb in micro-batches:  backward(CE sum(mb) / N * grad_divisor)  # the grad sum is the token mean's gradient
    clip, step                                                         # strategy.optimizer_step
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch

from sftdist.config import SFTConfig
from sftdist.data.batching import MicroBatch, build_micro_batches
from sftdist.data.dataset import Sample
from sftdist.errors import ConfigError
from sftdist.metrics.flops import ModelDims
from sftdist.model import build_model, max_positions, model_weights, num_parameters
from sftdist.model.attention import apply_packed_attention, packed_attention_kwargs, resolve_backend
from sftdist.parallel import Strategy
from sftdist.training.loss import (
    cross_entropy_sum,
    install_loss_head,
    loss_impl,
    step_normalised_loss,
    supervised_targets,
)
from sftdist.training.optim import build_optimizer

PADDED = "sdpa (padded)"  # the attention of data.packing=false: padded rows, no packed backend


class ModelRunner:
    """Runs the strategy's model on micro-batches. ``loss_impl`` and ``loss_why`` are set by ``choose_loss_impl``."""

    def __init__(
        self,
        model,
        optimizer,
        strategy: Strategy,
        cfg: SFTConfig,
        pad_id: int,
        dims: ModelDims,
        attention: str = PADDED,
    ):
        self.model, self.optimizer, self.strategy = model, optimizer, strategy
        self.dims, self.attention = dims, attention  # of the model before the strategy wrapped it
        self.num_params = self.num_trained = 0
        self.device = strategy.device
        self.cfg = cfg
        self.pad_id = pad_id
        self.loss_impl, self.loss_why = "naive", ""

    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def logits(self, mb: MicroBatch) -> torch.Tensor:
        with self.autocast():
            if mb.packed:
                return self.model(
                    input_ids=mb.input_ids,
                    position_ids=mb.position_ids,
                    use_cache=False,
                    **self._packed(mb),
                ).logits
            return self.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False).logits

    def _packed(self, mb: MicroBatch) -> dict:
        if mb.context is None:
            return packed_attention_kwargs(mb.cu_seqlens, mb.max_seqlen, mb.input_ids.shape[1])
        total = mb.context.gathered.numel()  # (the whole padded row: known on the host)
        return packed_attention_kwargs(mb.cu_seqlens, mb.max_seqlen, total, mb.context, self.strategy.context_group)

    def ce_sum(self, mb: MicroBatch, impl: str | None = None) -> torch.Tensor:
        """The micro-batch's summed cross-entropy over its supervised targets (training.loss), as ``impl`` (default: the
        run's) computes it: chunked, the model's head returns it in place of the logits."""
        if (impl or self.loss_impl) == "chunked":
            with supervised_targets(self.strategy.unwrap(self.model), mb.targets, mb.supervised_index):
                return self.logits(mb)
        return cross_entropy_sum(self.logits(mb), mb.targets)

    def choose_loss_impl(self, first_sample: Sample) -> None:
        """train.loss_impl resolved (training.loss.loss_impl), checked on the first training sample both ways through
        the strategy's model; rank 0's answer for all (every rank runs the same forwards)."""
        if self.cfg.train.loss_impl != "naive":
            install_loss_head(self.strategy.unwrap(self.model))

        @torch.no_grad()
        def naive_and_chunked() -> tuple[float, float]:
            self.model.eval()
            (mb,) = build_micro_batches(
                [first_sample], self.cfg.train.micro_batch_tokens, self.pad_id, self.cfg.data.packing
            )
            mb = mb.to(self.device)
            return float(self.ce_sum(mb, "naive")), float(self.ce_sum(mb, "chunked"))

        self.loss_impl, self.loss_why = self.strategy.broadcast_object(
            loss_impl(self.cfg.train.loss_impl, self.strategy.unwrap(self.model), naive_and_chunked)
        )

    def train_step(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches (the same count on every rank): gradients of
        the step's token-mean loss over all ranks, then clip and step."""
        stats = self.accumulate_gradients(micro_batches)
        stats["grad_norm"] = self.strategy.optimizer_step(
            self.optimizer, self.cfg.train.max_grad_norm, loss_finite=math.isfinite(stats["loss"])
        )  # (a step whose loss or gradient norm is not finite is left out: sftdist.training.nonfinite)
        return stats

    def accumulate_gradients(self, micro_batches: list[MicroBatch]) -> dict[str, float]:
        """Forward and backward of every micro-batch; the loss is normalised once, by the supervised tokens
        of the whole step on all ranks (one all-reduce, before any backward, of counts known on the host). The host
        waits for the device once per step (the summed loss), never per micro-batch: the copies are asynchronous
        (pinned on a GPU) and every count comes from the host."""
        self.model.train()
        (num_step_tokens,) = self.strategy.all_sum([sum(mb.num_supervised for mb in micro_batches)])
        ce_total = torch.zeros((), device=self.device, dtype=torch.float64)
        for i, mb in enumerate([mb.to(self.device) for mb in micro_batches]):
            with self.strategy.micro_step(last=i == len(micro_batches) - 1):
                ce = self.ce_sum(mb)
                self.strategy.backward(step_normalised_loss(ce, int(num_step_tokens), self.strategy.grad_divisor))
            ce_total += ce.detach()
        real = [mb for mb in micro_batches if mb.num_tokens]  # (not the empty ones of a rank with less work)
        ce_sum, tokens, slots, padding, budget = self.strategy.all_sum(
            [
                float(ce_total),
                sum(mb.num_tokens for mb in real),
                sum(mb.num_slots for mb in real),
                sum(mb.num_padding for mb in real),
                len(real) * self.cfg.train.micro_batch_tokens / self.strategy.context_parallel,  # (a row: cp shards)
            ]
        )
        return {
            "loss": ce_sum / num_step_tokens,  # the true token mean of the step
            "supervised_tokens": num_step_tokens,
            "tokens": tokens,
            "slots": slots,
            "padding": padding,
            "budget": budget,
        }

    @torch.no_grad()
    def loss_sums(self, micro_batches: Iterable[MicroBatch]) -> tuple[float, int]:
        """(summed cross-entropy, supervised tokens) of these micro-batches, without gradients."""
        self.model.eval()
        total, count = 0.0, 0
        for mb in micro_batches:
            mb = mb.to(self.device)
            total += float(self.ce_sum(mb))
            count += mb.num_supervised
        return total, count


def build_runner(cfg: SFTConfig, strategy: Strategy, tokenizer: Any, pad_id: int) -> ModelRunner:
    """The model (packed attention installed) and its optimizer, set up by the strategy, in a runner. fsdp2 and
    zero3 never build the model whole on a rank (fsdp2: on the meta device; zero3: partitioned as built); their
    setup loads the weights."""
    with strategy.constructing():
        model = build_model(cfg.model, tokenizer, cfg.seed, with_weights=not strategy.loads_weights)
    limit = max_positions(model)
    if limit is not None and cfg.data.max_length > limit:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} exceeds the model's "
            f"max_position_embeddings={limit}; lower data.max_length"
        )
    num_params, num_trained, dims = (
        num_parameters(model),
        num_parameters(model, trainable_only=True),
        ModelDims.of(model),
    )
    attention = PADDED
    if cfg.data.packing:
        # (context parallelism attends with sdpa, the one backend with a context-parallel form so far)
        name = "sdpa" if strategy.context_parallel > 1 else cfg.model.attn_impl
        attention = resolve_backend(name, strategy.device, cfg.precision)
        apply_packed_attention(model, attention)
    wrapped, optimizer = strategy.setup(
        model,
        lambda m: build_optimizer(m, cfg.train),
        lambda names: model_weights(cfg.model, tokenizer, cfg.seed, names),
    )
    runner = ModelRunner(wrapped, optimizer, strategy, cfg, pad_id, dims, attention)
    runner.num_params, runner.num_trained = num_params, num_trained
    return runner
